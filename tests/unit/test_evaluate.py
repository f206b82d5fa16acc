"""Evaluation end to end: evaluation every N training steps, and `megarl eval` on a megarl run
checkpoint and on its HF export, with pass@k checked against a brute-force count over the
sampled answers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"
EVAL = ("data.eval=[toy:arithmetic]", "eval.max_problems=12")


def megarl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "megarl", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that hold a correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def brute_maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    first = next(i for i, a in enumerate(answers[:k]) if a is not None and votes[a] == top)
    return float(correct[first])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    r = megarl("train", QUICKSTART, f"logging.dir={root}", "logging.run_name=run",
               "logging.sinks=[jsonl]", "trainer.steps=4", "trainer.eval_every=2",
               "trainer.eval_before_train=true", "eval.greedy=true", "eval.k=4",
               "checkpoint.save_hf=true", *EVAL)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def test_training_evaluates_every_n_steps(run: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "eval/toy:arithmetic/pass@4" in r]
    assert evaluated == [0, 2, 4]  # step 0: trainer.eval_before_train, the initial policy
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    last = records[-1]
    assert last["eval/toy:arithmetic/problems"] == 12
    assert 0 <= last["eval/mean/avg@4"] <= last["eval/mean/pass@4"] <= 1
    # every evaluation's answers, per problem, with the greedy decode (eval.greedy)
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "step_000000.jsonl", "step_000002.jsonl", "step_000004.jsonl"]
    for step in (0, 4):
        problems = [json.loads(line) for line in
                    (run / "eval" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(problems) == 12 and all(len(p["answers"]) == 4 for p in problems)
        greedy = sum(p["greedy_correct"] for p in problems) / 12
        assert records[step if step == 0 else -1]["eval/mean/greedy@1"] == pytest.approx(greedy)
        assert all(isinstance(p["greedy_response"], str) for p in problems)


def test_a_restarted_run_that_evaluates_first_logs_step_0_once(tmp_path: Path) -> None:
    args = ("train", QUICKSTART, f"logging.dir={tmp_path}", "logging.run_name=run",
            "logging.sinks=[jsonl]", "trainer.steps=1", "trainer.eval_before_train=true",
            "checkpoint.save_every=0", "checkpoint.resume=never", *EVAL)
    for _ in range(2):
        r = megarl(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


def test_eval_on_a_checkpoint_prints_tables_and_pass_at_k_is_exact(run: Path,
                                                                   tmp_path: Path) -> None:
    summary, samples = tmp_path / "summary.json", tmp_path / "samples.jsonl"
    r = megarl("eval", str(run / "config.yaml"), *EVAL, "eval.k=8", "--checkpoint", str(run),
               "--json", str(summary), "--samples", str(samples))
    assert r.returncode == 0, r.stderr[-3000:]
    for title in ("avg@k", "pass@k", "maj@k"):
        assert title in r.stdout
    assert "toy:arithmetic" in r.stdout and "mean" in r.stdout

    table = json.loads(summary.read_text())["toy:arithmetic"]
    problems = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(problems) == 12 and all(len(p["correct"]) == 8 for p in problems)
    assert table["problems"] == 12
    for k in (1, 2, 4, 8):
        want = sum(brute_pass_at_k(p["correct"], k) for p in problems) / len(problems)
        assert table[f"pass@{k}"] == pytest.approx(want, abs=1e-12), k
        avg = sum(sum(p["correct"][:k]) / k for p in problems) / len(problems)
        assert table[f"avg@{k}"] == pytest.approx(avg, abs=1e-12), k
        maj = sum(brute_maj_at_k(p["answers"], p["correct"], k) for p in problems) / 12
        assert table[f"maj@{k}"] == pytest.approx(maj, abs=1e-12), k

    # the HF export of the same run holds the same weights: the same samples, the same table
    again = tmp_path / "again.json"
    r = megarl("eval", str(run / "config.yaml"), *EVAL, "eval.k=8", "--checkpoint",
               str(run / "hf"), "--json", str(again))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(again.read_text()) == json.loads(summary.read_text())


def test_eval_without_benchmarks_is_a_one_line_error() -> None:
    r = megarl("eval", QUICKSTART, "data.eval=[]", "trainer.eval_every=0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.eval is empty"), r.stderr


def test_report_plots_a_run(run: Path) -> None:
    r = megarl("report", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(Path(line).name for line in r.stdout.split())
    assert pngs and all((run / "report" / name).stat().st_size > 1000 for name in pngs)
    assert any("reward" in name for name in pngs)
