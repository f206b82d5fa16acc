"""Checkpoints are verified before they are loaded: damage inside a checkpoint whose COMPLETE
marker stands is found (which file, what), the checkpoint is set aside and the newest intact one
is resumed; with none intact, one error line. Saves are durable (every file and folder fsync'ed
before COMPLETE) and leave no writer process behind a killed trainer.

One real quickstart run (2 steps, a checkpoint each) is shared by the tests; each test damages
its own copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megarl.errors import UserError
from megarl.run_checkpoints import (
    COMPLETE,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"
RUN = ("logging.sinks=[jsonl]", "logging.run_name=run", "checkpoint.save_every=1",
       "checkpoint.keep_last=3", "checkpoint.resume=auto")
TIMING = ("time", "sync/seconds")


def train(logdir: Path, steps: int, *extra: str, timeout: int = 600,
          session: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "megarl", "train", QUICKSTART, f"logging.dir={logdir}",
         f"trainer.steps={steps}", *RUN, *extra],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=timeout)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step quickstart run with checkpoints step_000001 and step_000002."""
    logdir = tmp_path_factory.mktemp("two_steps")
    r = train(logdir, 2, "checkpoint.save_hf=true")
    assert r.returncode == 0, r.stderr[-3000:]
    return logdir


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest / "run" / "checkpoints"


def flip_optimizer_bit(step: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip one bit of an fp32 optimizer tensor (Adam's first moment of the output layer)
    inside the .distcp file; returns the tensor before and after, as torch reads them."""
    policy = step / "policy"
    meta = FileSystemReader(str(policy)).read_metadata()
    index, where = next((i, s) for i, s in meta.storage_data.items()
                        if i.fqn.startswith("optimizer.state.exp_avg.output_layer"))
    blob = bytearray((policy / where.relative_path).read_bytes())
    record = bytes(blob[where.offset:where.offset + where.length])
    before = torch.load(io.BytesIO(record), weights_only=True)
    payload = record.find(before.numpy().tobytes())
    assert payload >= 0
    blob[where.offset + payload + 5] ^= 0x10  # one bit of the second element
    (policy / where.relative_path).write_bytes(bytes(blob))
    after = torch.load(io.BytesIO(bytes(blob[where.offset:where.offset + where.length])),
                       weights_only=True)
    return before, after


def _distcp(step: Path) -> Path:
    return next((step / "policy").glob("*.distcp"))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _scramble(path: Path) -> None:
    """Same size, different bytes (a torn sector)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


# name -> (damage, the file the report must name)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "trainer_state truncated": (lambda s: _truncate(s / "trainer_state.pt", 0.5),
                                "trainer_state.pt"),
    "trainer_state emptied": (lambda s: _truncate(s / "trainer_state.pt", 0.0),
                              "trainer_state.pt"),
    "trainer_state deleted": (lambda s: (s / "trainer_state.pt").unlink(), "trainer_state.pt"),
    "trainer_state scrambled": (lambda s: _scramble(s / "trainer_state.pt"),
                                "trainer_state.pt"),
    "distcp truncated": (lambda s: _truncate(_distcp(s), 0.5), ".distcp"),
    "distcp emptied": (lambda s: _truncate(_distcp(s), 0.0), ".distcp"),
    "distcp deleted": (lambda s: _distcp(s).unlink(), ".distcp"),
    "distcp scrambled": (lambda s: _scramble(_distcp(s)), ".distcp"),
    "optimizer bit flip": (flip_optimizer_bit, ".distcp"),
    ".metadata scrambled": (lambda s: _scramble(s / "policy" / ".metadata"), "policy/.metadata"),
    ".metadata truncated": (lambda s: _truncate(s / "policy" / ".metadata", 0.3),
                            "policy/.metadata"),
    ".metadata deleted": (lambda s: (s / "policy" / ".metadata").unlink(), "policy/.metadata"),
    "metadata.json damaged": (lambda s: (s / "policy" / "metadata.json").write_text("{"),
                              "policy/metadata.json"),
    "metadata.json deleted": (lambda s: (s / "policy" / "metadata.json").unlink(),
                              "policy/metadata.json"),
    "policy folder deleted": (lambda s: shutil.rmtree(s / "policy"), "policy/"),
    "manifest truncated": (lambda s: _truncate(s / COMPLETE, 0.5), COMPLETE),
    "manifest emptied": (lambda s: (s / COMPLETE).write_text(""), COMPLETE),
    "trainer_state of another step": (
        lambda s: shutil.copy(s.parent / "step_000001" / "trainer_state.pt",
                              s / "trainer_state.pt"), "trainer_state.pt"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
        two_steps: Path, tmp_path: Path, case: str) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    assert verify_checkpoint(ckpts / "step_000002") is None
    damage, culprit = DAMAGE[case]
    damage(ckpts / "step_000002")
    reports: list[str] = []
    chosen = resume_point(ckpts, report=reports.append)
    assert chosen == ckpts / "step_000001"
    assert len(reports) == 1 and "\n" not in reports[0], reports
    assert "step_000002" in reports[0] and culprit in reports[0], reports[0]
    assert "resuming from step_000001" in reports[0]
    # set aside, never deleted, and never picked again
    assert not (ckpts / "step_000002").exists()
    assert (ckpts / "step_000002.damaged").is_dir()
    assert resume_point(ckpts, report=reports.append) == ckpts / "step_000001"
    assert len(reports) == 1


def test_an_optimizer_bit_flip_changes_what_loads_and_is_caught(two_steps: Path,
                                                                  tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    before, after = flip_optimizer_bit(ckpts / "step_000002")
    assert not torch.equal(before, after)  # torch would have loaded the flipped value silently
    problem = verify_checkpoint(ckpts / "step_000002")
    assert problem is not None and "checksum mismatch" in problem and ".distcp" in problem
    with pytest.raises(UserError, match=r"step_000002 is damaged .*\.distcp"):
        load_checkpoint(ckpts / "step_000002", policy=None)


def test_every_checkpoint_damaged_is_one_error_and_nothing_renamed(two_steps: Path,
                                                                    tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    _truncate(_distcp(ckpts / "step_000002"), 0.5)
    (ckpts / "step_000001" / "trainer_state.pt").unlink()
    with pytest.raises(UserError) as info:
        resume_point(ckpts, report=pytest.fail)
    message = str(info.value)
    assert "no intact checkpoint" in message and "step_000001" in message
    assert "step_000002" in message and "checkpoint.resume=never" in message
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]


def test_a_checkpoint_from_before_manifests_still_resumes(two_steps: Path,
                                                           tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    (ckpts / "step_000002" / COMPLETE).write_text("2\n")  # what megarl wrote before
    assert resume_point(ckpts, report=pytest.fail) == ckpts / "step_000002"
    (ckpts / "step_000002" / "trainer_state.pt").unlink()
    assert verify_checkpoint(ckpts / "step_000002") == "trainer_state.pt: missing"


def records(logdir: Path) -> list[dict]:
    lines = (logdir / "run" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items()
             if k not in TIMING and not k.startswith("time/")} for line in lines]


def test_train_falls_back_past_a_damaged_checkpoint_and_repeats_the_run(
        two_steps: Path, tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    _truncate(_distcp(ckpts / "step_000002"), 0.5)
    r = train(tmp_path / "copy", 2)  # the same run (the lr schedule spans trainer.steps)
    assert r.returncode == 0, r.stderr[-3000:]
    out = (r.stdout + r.stderr).splitlines()
    warnings = [line for line in out if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and ".distcp" in warnings[0], out
    assert f"resuming from {ckpts / 'step_000001'} (step 1)" in out
    assert "Traceback" not in r.stderr
    assert (ckpts / "step_000002.damaged").is_dir()
    assert verify_checkpoint(ckpts / "step_000002") is None  # written anew
    assert records(tmp_path / "copy") == records(two_steps)  # step 2 redone exactly


def test_train_with_no_intact_checkpoint_is_one_error_line(two_steps: Path,
                                                           tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    for step in ("step_000001", "step_000002"):
        (ckpts / step / "policy" / ".metadata").unlink()
    r = train(tmp_path / "copy", 3)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.stderr and r.stderr.rstrip().endswith(errors[-1])
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint.resume=auto: no "
                                                     "intact checkpoint"), r.stderr[-3000:]
    assert "policy/.metadata: missing" in errors[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]


def test_an_explicit_damaged_resume_path_is_one_error_line(two_steps: Path,
                                                           tmp_path: Path) -> None:
    ckpts = copy_run(two_steps, tmp_path / "copy")
    flip_optimizer_bit(ckpts / "step_000002")
    r = train(tmp_path / "copy", 3, f"checkpoint.resume={ckpts / 'step_000002'}")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.stderr and r.stderr.rstrip().endswith(errors[-1])
    assert len(errors) == 1 and "step_000002 is damaged" in errors[0], r.stderr[-3000:]
    assert "checksum mismatch" in errors[0]
    assert (ckpts / "step_000002").is_dir()  # a path the user named is never renamed


class _FilePolicy:
    """Writes a policy folder like megatron's (two files in a subfolder)."""

    def save(self, directory: Path) -> None:
        (directory / "sub").mkdir(parents=True)
        (directory / "__0_0.distcp").write_bytes(os.urandom(4096))
        (directory / "sub" / "x.bin").write_bytes(b"x" * 100)


def test_save_fsyncs_every_file_and_folder_before_complete(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:  # fmt: skip
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    root = tmp_path / "ckpts"
    final = save_checkpoint(root, 7, _FilePolicy(), {"step": 7}, keep_last=None)
    tmp = str(root / ".step_000007.tmp")
    files = [f"{tmp}/{n}" for n in ("policy/__0_0.distcp", "policy/sub/x.bin",
                                     "trainer_state.pt")]
    folders = [f"{tmp}/policy/sub", f"{tmp}/policy", tmp]
    marker = synced.index(f"{tmp}/{COMPLETE}")
    for path in files + folders[:2]:
        assert path in synced[:marker], (path, synced)
    assert synced[marker + 1:] == [tmp, str(root)]  # the marker's folder, then the rename
    manifest = json.loads((final / COMPLETE).read_text())
    assert sorted(manifest["files"]) == ["policy/__0_0.distcp", "policy/sub/x.bin",
                                         "trainer_state.pt"]
    assert manifest["files"]["policy/sub/x.bin"]["bytes"] == 100
    assert verify_checkpoint(final) is None


def _session_members(sid: int) -> list[str]:
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == sid:
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                members.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return members


def test_no_checkpoint_writer_process_outlives_a_killed_trainer(tmp_path: Path) -> None:
    """SIGKILL the trainer alone (not its process group) right after its first checkpoint:
    nothing it started may be left running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "megarl", "train", QUICKSTART, f"logging.dir={tmp_path}",
         "trainer.steps=50", *RUN], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "run" / "checkpoints").glob("step_*/COMPLETE")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)
        assert _session_members(proc.pid) == []
    finally:
        for _ in range(2):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break


def test_a_training_checkpoint_converts_to_the_runs_hf_export(two_steps: Path,
                                                              tmp_path: Path) -> None:
    """One checkpoint format: ``megarl convert megatron-to-hf`` reads a run's ``policy/`` as it
    is (its ``hf/config.json`` included) and gives the tensors the run's own HF export has."""
    from safetensors.torch import load_file

    policy = two_steps / "run" / "checkpoints" / "step_000002" / "policy"
    assert (policy / "hf" / "config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "megarl", "convert", "megatron-to-hf",
                        "--megatron", str(policy), "--out", str(tmp_path / "hf")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    converted, exported = tensors(tmp_path / "hf"), tensors(two_steps / "run" / "hf")
    assert exported and set(converted) == set(exported)
    assert all(torch.equal(converted[k], exported[k]) for k in exported)
