"""Tests on a real Slurm cluster (``bash scripts/slurm-cluster.sh start``): marked ``slurm``; they
skip, with the reason shown, where no cluster answers. CI starts one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEFAULT_CONF = Path(os.environ.get("MEGARL_SLURM_DIR", "/tmp/megarl-slurm")) / "slurm.conf"


def slurm_conf() -> str | None:
    """The SLURM_CONF of a cluster that answers, or None."""
    conf = os.environ.get("SLURM_CONF") or (str(DEFAULT_CONF) if DEFAULT_CONF.is_file() else None)
    if conf is None or shutil.which("sbatch") is None:
        return None
    r = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": conf},
                       capture_output=True, text=True, timeout=30)
    return conf if r.returncode == 0 and "UP" in r.stdout else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = [item for item in items if item.nodeid.startswith("tests/slurm/")]
    for item in here:
        item.add_marker(pytest.mark.slurm)
        item.add_marker(pytest.mark.slow)
    if here and slurm_conf() is None:
        skip = pytest.mark.skip(reason="slurm test: no Slurm cluster answers (bash "
                                "scripts/slurm-cluster.sh start, as root)")
        for item in here:
            item.add_marker(skip)
