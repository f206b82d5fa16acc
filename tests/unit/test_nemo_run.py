"""nemo-run: the recipes as run.Config trees, and the launcher's dry runs on Slurm (4 nodes,
torchrun) and locally. Needs the `nemo` extra (CI installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.config import load_config

fdl = pytest.importorskip("fiddle", reason="the nemo extra is not installed: "
                          "pip install -e '.[nemo]'")
pytest.importorskip("nemo_run", reason="the nemo extra is not installed: pip install -e '.[nemo]'")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "examples/configs/up_gspo_30b.yaml"


def test_recipe_as_run_config_builds_the_same_config() -> None:
    from megarl.nemo import train_task

    task = train_task(ROOT / RECIPE, ["trainer.steps=7"])
    assert task.config.trainer.lr == 1e-6 and task.config.parallel.world_size == 32
    task.config.trainer.lr = 2e-6  # editable in Python before a launch
    built = fdl.build(task.config)
    want = load_config(ROOT / RECIPE, ["trainer.steps=7", "trainer.lr=2e-6"])
    assert built == want


def dryrun(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "400", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "examples/nemo_run/launch.py", *args, "--dryrun",
                        "--job-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return " ".join((r.stdout + r.stderr).split())


def test_slurm_dry_run_starts_one_torchrun_per_node(tmp_path: Path) -> None:
    out = dryrun(tmp_path, RECIPE, "--slurm", "--account", "acc", "--partition", "batch",
                 "--nodes", "4", "trainer.steps=7")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --account=acc",
                 "#SBATCH --partition=batch", "export VLLM_ENABLE_V1_MULTIPROCESSING=0",
                 "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False",
                 "--nnodes 4 --nproc-per-node 8", "nemo_run.core.runners.fdl_runner"):
        assert line in out, line


def test_slurm_refuses_a_node_count_that_does_not_match_the_layout(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "examples/nemo_run/launch.py", RECIPE, "--slurm",
                        "--account", "a", "--partition", "p", "--nodes", "2", "--dryrun"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs --nodes 4" in r.stderr, r.stderr[-2000:]


def test_local_dry_run_of_the_quickstart(tmp_path: Path) -> None:
    out = dryrun(tmp_path, "examples/configs/quickstart.yaml")
    assert "quickstart" in out and "VLLM_ENABLE_V1_MULTIPROCESSING" in out
