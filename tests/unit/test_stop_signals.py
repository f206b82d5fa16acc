"""Stopping without losing work (megarl/stop_signals.py): SIGUSR1 or SIGTERM make `megarl train`
finish its step, write a checkpoint, report it in ``$MEGARL_STOP_STATUS`` and exit 0; a resume
then repeats the uninterrupted run exactly. With ``trainer.stop_grace_s`` a rank still in its
step after that long exits at once (143)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ("examples/configs/quickstart.yaml", "trainer.eval_every=0", "checkpoint.save_every=100",
       "logging.sinks=[jsonl]", "logging.run_name=run")
TIMING = ("time", "sync/seconds")


def start(logdir: Path, steps: int, *extra: str, status: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if status is not None:
        env["MEGARL_STOP_STATUS"] = str(status)
    return subprocess.Popen([sys.executable, "-m", "megarl", "train", *RUN,
                             f"trainer.steps={steps}", f"logging.dir={logdir}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def records(logdir: Path) -> list[dict]:
    path = logdir / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def signal_after(proc: subprocess.Popen, logdir: Path, steps_done: int, sig: int) -> None:
    end = time.monotonic() + 300
    while len(records(logdir)) < steps_done:
        assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_stop_signal_checkpoints_the_step_and_the_resume_repeats_the_run(
        tmp_path: Path, sig: int) -> None:  # fmt: skip
    steps = 6
    reference = start(tmp_path / "reference", steps)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

    status = tmp_path / "status.json"
    proc = start(tmp_path / "stopped", steps, status=status)
    signal_after(proc, tmp_path / "stopped", 2, sig)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    report = json.loads(status.read_text())
    stopped = report["step"]
    assert report["reason"] == signal.Signals(sig).name and report["start_step"] == 0
    assert 2 <= stopped < steps, report  # it stopped early, after a finished step
    checkpoint = tmp_path / "stopped" / "run" / "checkpoints" / f"step_{stopped:06d}"
    assert report["checkpoint"] == str(checkpoint) and (checkpoint / "COMPLETE").is_file()
    assert f"stopped after step {stopped} with checkpoint {checkpoint}" in out
    assert len(records(tmp_path / "stopped")) == stopped

    resumed = start(tmp_path / "stopped", steps, status=status)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"(step {stopped})" in out and json.loads(status.read_text())["reason"] == "finished"
    assert without_timing(records(tmp_path / "stopped")) == without_timing(
        records(tmp_path / "reference"))


def test_a_step_longer_than_the_grace_ends_the_process_at_once(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    proc = start(tmp_path / "run", 50, "trainer.stop_grace_s=0.001", status=status)
    signal_after(proc, tmp_path / "run", 1, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "did not end within trainer.stop_grace_s=0.001" in out
    assert not status.exists()


def test_without_a_signal_nothing_changes(tmp_path: Path) -> None:
    from megarl.stop_signals import StopRequests

    stops = StopRequests()
    stops.install()
    try:
        assert signal.getsignal(signal.SIGUSR1) == stops._handle
        assert not stops.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stops.agreed() and stops.signal == "SIGUSR1"
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
