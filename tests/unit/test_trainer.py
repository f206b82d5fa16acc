"""The RL loop end to end on CPU: `megarl train` on the quickstart (a tiny Qwen3-MoE built from
scratch, the embedded HF engine, R3, a synthetic arithmetic task), as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"


def train(tmp: Path, *overrides: str, timeout: int = 600) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "megarl", "train", QUICKSTART, f"logging.dir={tmp}",
         "logging.run_name=run", "logging.sinks=[jsonl]", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def window(history: list[dict], start: int, size: int = 10) -> float:
    return sum(h["reward/mean"] for h in history[start:start + size]) / size


@pytest.mark.parametrize("loss", ["up_gspo", "grpo"])
def test_quickstart_learns(tmp_path: Path, loss: str) -> None:
    """A shortened quickstart (70 steps at the quickstart's peak learning rate): the reward of
    the last 10 steps is far above the first 10's, and R3 keeps the train log-probs on the
    engine's."""
    history = train(tmp_path, f"algo.loss={loss}", "trainer.steps=70",
                    "trainer.lr_schedule=constant")
    assert [h["step"] for h in history] == list(range(1, 71))
    first, last = window(history, 0), window(history, 60)
    assert last >= first + 0.2, (first, last)
    assert max(h["rollout/logp_abs_diff_max"] for h in history) < 1e-4
    ckpt = tmp_path / "run" / "checkpoints" / "step_000070"
    assert (ckpt / "COMPLETE").is_file()


def test_a_token_budget_run_equals_the_counted_run(tmp_path: Path) -> None:
    """`megarl train` with `trainer.max_tokens_per_micro_batch` (old log-probs with R3, updates)
    logs what the counted run logs, up to float32 summation order: the cut changes no number
    but its own `batch/*` ones."""
    common = ("trainer.steps=2", "trainer.eval_every=0", "checkpoint.save_every=0")
    counted = train(tmp_path / "counted", *common)
    budget = train(tmp_path / "budget", *common, "trainer.max_tokens_per_micro_batch=40")
    assert len(counted) == len(budget) == 2
    for a, b in zip(counted, budget, strict=True):
        assert b["batch/micro_batches"] > a["batch/micro_batches"]  # 40-token rows: many
        assert b["batch/row_tokens/max"] <= 40
        compared = [k for k, v in a.items() if isinstance(v, int | float) and not k.startswith(
            ("time", "step", "sync/", "batch/", "perf/")) and "per_s" not in k]
        assert len(compared) > 40  # rewards, lengths, the losses and their metrics, KL
        for k in compared:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
