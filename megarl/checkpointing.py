"""Run checkpoints: the policy (megatron distributed checkpoint of model and optimizer) and the
trainer's state (step, data position, RNG states), written atomically.

Layout: ``<dir>/step_000010/{policy/, trainer_state.pt, COMPLETE}``. A checkpoint is written
into ``<dir>/.step_000010.tmp`` and renamed into place after ``COMPLETE`` is written, so a
process killed mid-save leaves only a temporary directory, which `latest_checkpoint` never
picks up and the next save removes. The last ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megarl.errors import UserError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, policy: Any, trainer_state: dict[str, Any],
                    keep_last: int | None) -> Path:  # fmt: skip
    """Write step `step`'s checkpoint atomically (collective); prune to `keep_last`."""
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    policy.save(tmp / "policy")
    _barrier()  # every rank's shards are written before the marker
    if _rank() == 0:
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last is not None:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, policy: Any) -> dict[str, Any]:
    """Restore the policy from `path` and return the trainer state (RNG states restored)."""
    if not (path / COMPLETE).is_file():
        raise UserError(f"checkpoint.resume={path}: not a complete megarl checkpoint (no "
                        f"{COMPLETE} marker); give a step_* directory or 'auto'")
    policy.load(path / "policy")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
