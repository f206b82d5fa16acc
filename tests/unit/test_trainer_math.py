"""The loop on real data: GSM8K prompts through `datasets`, a real BPE tokenizer with a chat
template, the math-verify reward in its process pool, and evaluation on two of the offline
benchmark sets (a tiny random Qwen3-MoE: this checks the wiring, not learning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets

from tests.unit.offline_data import DATA, bpe_tokenizer, needs_data

ROOT = Path(__file__).resolve().parents[2]


@needs_data
def test_train_on_gsm8k_with_the_math_reward_and_evaluate(tmp_path: Path) -> None:
    train = datasets.load_from_disk(str(DATA / "train" / "gsm_8k"))["train"]
    tok = bpe_tokenizer(list(train.select(range(300))["problem"]), vocab_size=800)
    tok.save_pretrained(tmp_path / "tokenizer")
    overrides = [
        f"model.tokenizer={tmp_path / 'tokenizer'}", f"model.hf_config.vocab_size={len(tok)}",
        "model.hf_config.max_position_embeddings=512",
        f"data.train={DATA / 'train' / 'gsm_8k'}", "data.template=chat", "data.reward=math",
        "data.reward_workers=2",
        f"data.eval=[{DATA / 'evaluation_suite'}@aime,{DATA / 'evaluation_suite'}@minerva]",
        "eval.k=2", "eval.max_problems=3", "trainer.eval_every=2",
        "rollout.max_prompt_len=400", "rollout.max_response_len=8", "trainer.steps=2",
        "trainer.prompts_per_step=4", "rollout.n_samples=4", "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=8", "logging.sinks=[jsonl]", f"logging.dir={tmp_path}",
        "logging.run_name=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "megarl", "train",
                        "examples/configs/quickstart.yaml", *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert [x["step"] for x in records] == [1, 2]
    last = records[-1]
    for name in ("reward/mean", "reward/parse_failures", "reward/timeouts", "reward/no_answer"):
        assert name in last, sorted(last)
    assert last["reward/no_answer"] > 0.9  # a random model writes no \boxed{} answer
    assert last["eval/aime/problems"] == 3 and last["eval/minerva/problems"] == 3
    assert last["eval/mean/pass@2"] == 0.0
    assert last["rollout/logp_abs_diff_max"] < 1e-4
