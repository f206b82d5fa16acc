"""slurm/lib/launch.sh on a real Slurm cluster (scripts/slurm-cluster.sh: 8 nodes on this host,
8 fake GPUs each): the real job scripts are accepted, a quickstart job trains exactly like a
plain torchrun run, a stop (USR1 by hand or from a real time limit) requeues and resumes from the
step it was at, and each defect the launcher had is gone (docs/slurm.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import slurm_conf

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "slurm").glob("*.sh"))
VENV_BIN = ROOT / ".venv" / "bin"
TIMING = ("time", "sync/seconds")
# the quickstart, small: 2 ranks (dp 2), no eval, a checkpoint every 2 steps
QUICK = ("parallel.world_size=2", "trainer.eval_every=0", "checkpoint.save_every=2",
         "logging.sinks=[jsonl]")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGARL_"))}
    return {**base, "SLURM_CONF": slurm_conf() or "", "PATH": f"{VENV_BIN}:{base['PATH']}",
            "OMP_NUM_THREADS": "1", **extra}


def job_script(tmp: Path, header: list[str], recipe: str = "examples/configs/quickstart.yaml",
               name: str = "job.sh") -> Path:
    """A job script in the real scripts' form (slurm/up_gspo_30b.sh): a header, the traps, the
    library, one megarl_launch line."""
    body = JOBS[0].read_text().split("#SBATCH", 1)[0]  # the shebang and the comments
    code = [line for line in JOBS[0].read_text().splitlines()
            if line.strip() and not line.startswith("#") and "megarl_launch" not in line]
    lines = [body.strip(), *(f"#SBATCH {h}" for h in header), *code,
             'source "$MEGARL_ROOT/slurm/lib/launch.sh"' if not any("source" in c for c in code)
             else "", f'megarl_launch {recipe} "$@"']
    path = tmp / name
    path.write_text("\n".join(line for line in lines if line) + "\n")
    return path


def submit(script: Path, *args: str, cwd: Path, extra_env: dict[str, str] | None = None,
           options: tuple[str, ...] = ()) -> int:
    r = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd,
                       env=env(MEGARL_ROOT=str(ROOT), **(extra_env or {})), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().split(";")[0])


def job_field(job: int, key: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", str(job), "-o"], env=env(),
                       capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{key}=(\S*)", r.stdout)
    return match.group(1) if match else ""


def wait_done(job: int, timeout: float) -> str:
    """The job's final state (COMPLETED, FAILED, ...) once it has one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", str(job)], env=env(), timeout=30)
    raise AssertionError(f"job {job} still {job_field(job, 'JobState')} after {timeout} s")


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        keep = [k for k in x if not k.startswith(TIMING)]
        assert {k: x[k] for k in keep} == {k: y.get(k) for k in keep}, x["step"]


def torchrun_reference(tmp: Path, steps: int) -> list[dict]:
    """The same config under a plain torchrun (2 ranks on this host)."""
    out = tmp / "reference"
    r = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
                        "megarl", "train", "examples/configs/quickstart.yaml", *QUICK,
                        f"trainer.steps={steps}", f"logging.dir={out}", "logging.run_name=ref"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return records(out / "ref")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return torchrun_reference(tmp_path_factory.mktemp("torchrun"), 8)


def output_of(cwd: Path, job: int) -> str:
    files = list(cwd.glob(f"*-{job}.out"))
    return files[0].read_text() if files else ""


def test_every_real_job_script_is_accepted_by_sbatch(tmp_path: Path) -> None:
    for job in JOBS:
        r = subprocess.run(["sbatch", "--test-only", str(job)], cwd=tmp_path,
                           env=env(MEGARL_ROOT=str(ROOT)), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "to start at" in r.stderr, (job.name, r.stderr)


@pytest.mark.parametrize("layout", ["1x2", "2x1"])
def test_a_cpu_job_trains_like_torchrun(tmp_path: Path, reference: list[dict],
                                        layout: str) -> None:
    """No GPUs asked for (no gres request reaches srun), nodes whose names do not resolve (the
    rendezvous uses NodeAddr), submitted from a folder that is not the checkout (the job's
    output lands there); 1 node x 2 ranks and 2 nodes x 1 rank."""
    nodes, ranks = (int(n) for n in layout.split("x"))
    script = job_script(tmp_path, [f"--job-name=cpu-{layout}", f"--nodes={nodes}",
                                   f"--ntasks-per-node={ranks}", "--cpus-per-task=1",
                                   "--output=%x-%j.out"])
    logs = tmp_path / "runs"
    job = submit(script, *QUICK, "trainer.steps=8", f"logging.dir={logs}",
                 cwd=tmp_path, extra_env={"LOG_ROOT": str(tmp_path / "logs")})
    state = wait_done(job, 900)
    out = output_of(tmp_path, job)
    assert state == "COMPLETED", out[-3000:]
    (run,) = list(logs.iterdir())
    assert run.name.startswith(f"cpu-{layout}-{job}-")  # JOBNAME-JOBID-SUBMITTED
    same_metrics(records(run), reference)
    (commands,) = (tmp_path / "logs" / run.name / "commands.sh").read_text().splitlines()
    assert "--gpus-per-node" not in commands and "--rdzv-endpoint=127.0.0.1:" in commands
    assert f"--nproc-per-node={ranks}" in commands


def test_usr1_mid_run_checkpoints_requeues_and_resumes_exactly(tmp_path: Path,
                                                              reference: list[dict]) -> None:
    script = job_script(tmp_path, ["--job-name=usr1", "--nodes=1", "--ntasks-per-node=2",
                                   "--output=%x-%j.out", "--open-mode=append", "--requeue"])
    logs = tmp_path / "runs"
    job = submit(script, *QUICK, "trainer.steps=8", "checkpoint.save_every=4",
                 f"logging.dir={logs}", cwd=tmp_path,
                 extra_env={"LOG_ROOT": str(tmp_path / "logs")})
    wait_for(lambda: any(len(records(r)) >= 2 for r in logs.glob("*")), 600, "step 2")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=env(), check=True)
    state = wait_done(job, 900)
    out = output_of(tmp_path, job)
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", out[-3000:]
    (run,) = list(logs.iterdir())
    (status,) = [json.loads(p.read_text()) for p in (tmp_path / "logs" / run.name).glob(
        "stop-attempt0.json")]
    stopped = status["step"]
    assert status["reason"] == "SIGUSR1" and status["start_step"] == 0 and 2 <= stopped < 8
    (attempt1,) = (tmp_path / "logs" / run.name).glob("attempt1-*.log")  # %N: the host's name
    resumed = attempt1.read_text()
    assert f"resuming from {run}/checkpoints/step_{stopped:06d} (step {stopped})" in resumed
    same_metrics(records(run), reference)  # every step once, equal to the uninterrupted run


def test_a_real_time_limit_requeues_twice_and_loses_nothing(tmp_path: Path) -> None:
    """--time=3 minutes, the signal 100 s before (Slurm checks limits every ~30 s): each attempt
    trains until the signal, stops with a checkpoint and is requeued; every step is logged
    exactly once."""
    steps = 400
    script = job_script(tmp_path, ["--job-name=limit", "--nodes=1", "--ntasks-per-node=2",
                                   "--output=%x-%j.out", "--open-mode=append", "--requeue",
                                   "--time=00:03:00", "--signal=B:USR1@100"])
    logs = tmp_path / "runs"
    job = submit(script, *QUICK, f"trainer.steps={steps}", "checkpoint.save_every=1000",
                 f"logging.dir={logs}", cwd=tmp_path,
                 extra_env={"LOG_ROOT": str(tmp_path / "logs")})
    wait_for(lambda: job_field(job, "Restarts") not in ("", "0", "1"), 900, "a second requeue")
    subprocess.run(["scancel", str(job)], env=env(), check=True)
    wait_done(job, 300)
    (run,) = list(logs.iterdir())
    stops = [json.loads(p.read_text()) for p in sorted((tmp_path / "logs" / run.name).glob(
        "stop-attempt*.json"))]
    assert len(stops) >= 2 and all(s["reason"] == "SIGUSR1" for s in stops[:2])
    assert stops[1]["start_step"] == stops[0]["step"] > 0
    assert stops[1]["step"] > stops[1]["start_step"]
    steps_logged = [r["step"] for r in records(run)]
    assert steps_logged == list(range(1, len(steps_logged) + 1))  # each step once, in order


def test_a_failing_requeue_ends_the_job_after_its_checkpoint(tmp_path: Path) -> None:
    script = job_script(tmp_path, ["--job-name=norequeue", "--nodes=1",
                                   "--ntasks-per-node=2", "--output=%x-%j.out",
                                   "--no-requeue"])
    logs = tmp_path / "runs"
    job = submit(script, *QUICK, "trainer.steps=50", f"logging.dir={logs}", cwd=tmp_path,
                 extra_env={"LOG_ROOT": str(tmp_path / "logs")})
    wait_for(lambda: any(len(records(r)) >= 1 for r in logs.glob("*")), 600, "step 1")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=env(), check=True)
    state = wait_done(job, 600)
    out = output_of(tmp_path, job)
    (run,) = list(logs.iterdir())
    stopped = len(records(run))
    assert state == "COMPLETED" and stopped < 50, out[-3000:]
    assert "scontrol requeue failed" in out
    assert (run / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()


def test_a_signal_before_any_step_is_not_requeued(tmp_path: Path) -> None:
    """A time limit that leaves no time to train must not requeue forever. The signal comes
    while the launcher sets up (a slow `date` on PATH holds it there): the job stays alive to
    say why, and ends without a requeue."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "date").write_text('#!/bin/bash\ntouch "$SLOW_MARK"\nsleep 6\nexec /bin/date "$@"\n')
    (slow / "date").chmod(0o755)
    script = job_script(tmp_path, ["--job-name=early", "--nodes=1", "--ntasks-per-node=2",
                                   "--output=%x-%j.out", "--requeue"])
    mark = tmp_path / "in-setup"
    job = submit(script, *QUICK, "trainer.steps=5", f"logging.dir={tmp_path / 'runs'}",
                 cwd=tmp_path, extra_env={"PATH": f"{slow}:{env()['PATH']}",
                                          "SLOW_MARK": str(mark)})
    wait_for(mark.exists, 300, "the launcher's set-up")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=env(), check=True)
    state = wait_done(job, 300)
    out = output_of(tmp_path, job)
    assert state == "FAILED" and job_field(job, "Restarts") == "0", out[-3000:]
    assert "trained no step before the time-limit signal: not requeueing" in out


def test_two_jobs_on_one_node_get_their_own_port_and_threads(tmp_path: Path) -> None:
    """Jobs sharing a node rendezvous on different ports; OMP_NUM_THREADS is the CPUs Slurm
    gives a node over its ranks (a stand-in torchrun records what it was given)."""
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/bash\necho \"$OMP_NUM_THREADS $*\" > \"$FAKE_OUT.$SLURM_JOB_ID\"\n"
                    "sleep 8\n")
    fake.chmod(0o755)
    script = job_script(tmp_path, ["--job-name=share", "--nodes=1", "--ntasks-per-node=2",
                                   "--cpus-per-task=2", "--output=%x-%j.out",
                                   "--nodelist=megarl-n1"])
    extra = {"TORCHRUN": str(fake), "FAKE_OUT": str(tmp_path / "seen"),
             "OMP_NUM_THREADS": ""}  # empty: the launcher's default applies
    jobs = [submit(script, cwd=tmp_path, extra_env=extra) for _ in range(2)]
    for job in jobs:
        assert wait_done(job, 300) == "COMPLETED", output_of(tmp_path, job)
    seen = [(tmp_path / f"seen.{job}").read_text().split() for job in jobs]
    ports = [re.search(r"--rdzv-endpoint=\S+:(\d+)", " ".join(s)).group(1) for s in seen]
    assert ports[0] != ports[1]
    assert [s[0] for s in seen] == ["2", "2"]  # 4 CPUs on the node / 2 ranks
