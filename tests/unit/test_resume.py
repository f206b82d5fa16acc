"""Crash and resume: SIGKILL the quickstart at a random step, restart it with `resume: auto`,
and the run's per-step metrics equal an uninterrupted run's bit for bit (CPU, same seed). A torn
checkpoint directory (no COMPLETE marker, or a half-written temporary) is never picked up."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"
STEPS = 8
SHORT = (f"trainer.steps={STEPS}", "checkpoint.save_every=2", "checkpoint.keep_last=2",
         "algo.kl_beta=0.01",  # the KL reference is rebuilt on resume
         "logging.sinks=[jsonl]", "logging.run_name=run", "checkpoint.resume=auto")
# wall-clock readings are the only values allowed to differ
TIMING = ("time", "sync/seconds")


def command(root: Path) -> list[str]:
    return [sys.executable, "-m", "megarl", "train", QUICKSTART, f"logging.dir={root}", *SHORT]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def records(root: Path) -> list[dict]:
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING and not k.startswith("time/")}


def run_to_end(root: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(command(root), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_at(root: Path, step: int) -> None:
    """Start the run and SIGKILL it, with every process it started (as Slurm kills a job), as
    soon as ``step`` is logged."""
    proc = subprocess.Popen(command(root), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = root / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            raise AssertionError(f"step {step} never logged")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # megatron's checkpoint writer process too
        proc.wait()


def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run_bit_for_bit(
        tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_to_end(reference)
    expected = [without_timings(r) for r in records(reference)]
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    crashed = tmp_path / "crashed"
    kill_step = random.Random().randint(1, STEPS - 1)
    kill_at(crashed, kill_step)
    ckpts = crashed / "run" / "checkpoints"
    complete = sorted(p.name for p in ckpts.glob("step_*") if (p / "COMPLETE").exists())
    # torn directories that must never be resumed from: a newer step without its marker (a
    # copy cut short) and a half-written temporary
    torn = ckpts / "step_000999"
    (torn / "policy").mkdir(parents=True)
    (torn / "trainer_state.pt").write_bytes(b"torn")
    (ckpts / ".step_001000.tmp" / "policy").mkdir(parents=True)

    resumed = run_to_end(crashed)
    got = [without_timings(r) for r in records(crashed)]
    if complete:  # killed before the first checkpoint (step 1): a fresh start
        assert f"resuming from {ckpts / complete[-1]}" in resumed.stdout + resumed.stderr
    else:
        assert "resuming from" not in resumed.stdout + resumed.stderr
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), (kill_step, complete)
    for want, have in zip(expected, got, strict=True):
        assert have == want, (kill_step, complete, want["step"])
