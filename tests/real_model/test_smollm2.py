"""The real-model path end to end: SmolLM2-135M-Instruct's real weights, tokenizer and chat
template through ``megarl train`` (HF -> Megatron, rollout, the reasoning-gym reward on free
text, a Megatron update, sync, greedy and sampled evaluation, the HF export), then the export
and the original checkpoint decoded by a fresh engine that never saw the training process.

Marked ``real_model`` (skipped, with the reason shown, until ``.venv/bin/python
tools/fetch_smollm2.py`` has built the folder; CI builds it). The first test runs in .venv on
the embedded transformers engine; the second, marked ``vllm`` too, runs in .venv-vllm with vLLM
as the rollout engine and as the fresh engine. Each is sized to about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/smollm2_arith.yaml"
# 2 steps of 2 prompts x 4 samples; 8 held-out problems, evaluated before training and after
SMALL = ("trainer.steps=2", "trainer.prompts_per_step=2", "rollout.n_samples=4",
         "trainer.mini_batch_size=8", "trainer.micro_batch_size=8", "rollout.max_response_len=32",
         "trainer.eval_every=2", "trainer.eval_before_train=true", "eval.greedy=true",
         "eval.k=2", "eval.max_problems=8", "checkpoint.save_every=0", "checkpoint.save_hf=true",
         "algo.old_logprobs=recompute", "logging.sinks=[jsonl]")


def run(*args: str, timeout: int = 900) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    return output


def train_and_check(tmp: Path, smollm2: Path, engine: str) -> None:
    run("-m", "megarl", "train", CONFIG, f"model.name_or_path={smollm2}",
        f"rollout.engine={engine}", f"logging.dir={tmp}", "logging.run_name=run", *SMALL)
    out = tmp / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    base, *steps = records
    for r in steps:
        # the engine samples free text; the reward reads a number from most of it (a random or
        # mis-loaded model would not write numbers), and the trainer's log-probs of the sampled
        # tokens equal the engine's: the same real weights on both sides of the sync
        assert r["reward/no_answer"] < 0.5, r
        assert r["response/length_mean"] > 3
        assert r["rollout/logp_abs_diff_max"] < 1e-3, r
    for r in (base, steps[-1]):
        assert r["eval/reasoning_gym:chain_sum/problems"] == 8
        assert 0 <= r["eval/mean/greedy@1"] <= 1
    # the records end in the chat template's EOS: stopped by it, not by the length cap
    records_0 = [json.loads(line) for line in
                 (out / "eval" / "step_000000.jsonl").read_text().splitlines()]
    assert sum(p["greedy_response"].endswith("<|im_end|>") for p in records_0) >= 6
    assert sum(p["greedy_answer"] is not None for p in records_0) >= 6
    # a fresh engine on the original checkpoint decodes what megarl's evaluation did before
    # training (the HF -> Megatron load), and on the export what it did after (the export)
    tool = "tools/check_export.py"
    common = (CONFIG, *SMALL, f"model.name_or_path={smollm2}", "--engine",
              "vllm" if engine == "vllm" else "transformers")
    before = run(tool, *common, "--hf", str(smollm2), "--against",
                 str(out / "eval" / "step_000000.jsonl"))
    assert "8/8 greedy responses identical" in before, before
    after = run(tool, *common, "--hf", str(out / "hf"), "--against",
                str(out / "eval" / "step_000002.jsonl"), "--out", str(tmp / "check.json"))
    report = json.loads((tmp / "check.json").read_text())["benchmarks"]
    assert report["reasoning_gym:chain_sum"]["same_response"] == 8, after
    assert report["reasoning_gym:chain_sum"]["greedy@1_fresh"] == \
        steps[-1]["eval/mean/greedy@1"]
    # the export holds its tokenizer and chat template, and weights the updates changed
    assert (out / "hf" / "tokenizer.json").is_file()
    assert "im_start" in (out / "hf" / "chat_template.jinja").read_text()
    from safetensors import safe_open

    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(smollm2 / "model.safetensors", "pt") as a, \
            safe_open(next((out / "hf").glob("*.safetensors")), "pt") as b:
        before_w, after_w = a.get_tensor(name), b.get_tensor(name)
    assert before_w.shape == after_w.shape and not before_w.equal(after_w)


def test_smollm2_two_steps_eval_export_and_reload(tmp_path: Path, smollm2: Path) -> None:
    train_and_check(tmp_path, smollm2, "hf")


@pytest.mark.vllm
def test_smollm2_two_steps_on_vllm_eval_export_and_reload(tmp_path: Path,
                                                           smollm2: Path) -> None:
    train_and_check(tmp_path, smollm2, "vllm")
