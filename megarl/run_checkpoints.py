"""Run checkpoints: the policy (megatron distributed checkpoint of model and optimizer) and the
trainer's state (step, data position, RNG states), written atomically and durably, verified
before they are loaded.

Layout: ``<dir>/step_000010/{policy/, trainer_state.pt, COMPLETE}``. A checkpoint is written
into ``<dir>/.step_000010.tmp``; every file in it is read back once to checksum it and fsync'ed,
then ``COMPLETE`` is written (and fsync'ed) holding the manifest: every file's relative path,
size and xxh3-128 digest. The folders are fsync'ed and the temporary is renamed into place (and
its parent fsync'ed), so a process or machine that dies at any moment leaves either the previous
checkpoints alone or a complete new one; `latest_checkpoint` never picks up a temporary, and the
next save removes it. The last ``keep_last`` complete checkpoints are kept.

Resuming verifies the manifest before anything is loaded (every rank checks a share of the
files). With ``checkpoint.resume=auto`` a damaged newest checkpoint is reported in one line, set
aside as ``step_000010.damaged`` (renamed, never deleted) and the newest intact one is used; with
none intact the run stops with one error line and leaves them where they are.

xxh3-128 (the `xxhash` package) hashes at ~14 GB/s on one core of the dev machines, an order
faster than sha256 (1.4 GB/s) or crc32 (3.3 GB/s): verifying is bound by reading the files, not
by the hash (benchmarks/checkpoint_integrity.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from megarl.errors import UserError

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = "megarl-checkpoint/1"
DIGEST = "xxh3_128"
DAMAGED_SUFFIX = ".damaged"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 16 << 20


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint under `root` with a ``COMPLETE`` marker, oldest
    first (not yet verified: see `verify_checkpoint`)."""
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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_shares(items: list[str], work: Callable[[str], Any]) -> dict[str, Any]:
    """``{item: work(item)}`` with every rank doing every world-th item, merged on all ranks."""
    mine = {item: work(item) for item in items[_rank()::_world()]}
    if not dist.is_initialized() or _world() == 1:
        return mine
    parts: list[Any] = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


# ---- durability and digests -----------------------------------------------------------------


def file_digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """``(size, xxh3-128 hex digest)`` of a file, read once; ``sync`` also fsyncs it."""
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, hasher.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the marker, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != COMPLETE)


def write_manifest(directory: Path, step: int) -> dict[str, Any]:
    """Checksum and fsync every file of a written checkpoint (collective: each rank does a
    share), then write and fsync ``COMPLETE`` with the manifest on rank 0."""
    names = _broadcast(_files(directory) if _rank() == 0 else None)
    digests = _gather_shares(names, lambda name: file_digest(directory / name, sync=True))
    manifest = {"format": MANIFEST_FORMAT, "step": step, "digest": DIGEST,
                "files": {name: {"bytes": digests[name][0], DIGEST: digests[name][1]}
                          for name in names}}
    if _rank() == 0:
        for folder in sorted({(directory / n).parent for n in names}, reverse=True):
            fsync_dir(folder)
        with open(directory / COMPLETE, "w") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(directory)
    _barrier()
    return manifest


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest in ``COMPLETE``; None for a checkpoint written before manifests existed
    (its marker holds only the step). Raises ValueError when the marker is damaged."""
    text = (path / COMPLETE).read_text(errors="replace")
    if re.fullmatch(r"\d+\n?", text):
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{COMPLETE}: unreadable manifest ({e.msg} at byte {e.pos})") from e
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict) or not manifest["files"]):
        raise ValueError(f"{COMPLETE}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def _check_file(path: Path, name: str, want: dict[str, Any]) -> str | None:
    file = path / name
    if not file.is_file():
        return f"{name}: missing"
    size = file.stat().st_size
    if size != want.get("bytes"):
        return f"{name}: {size} bytes, the manifest says {want.get('bytes')}"
    if file_digest(file)[1] != want.get(DIGEST):
        return f"{name}: checksum mismatch (the bytes changed after it was written)"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (which file, what), or None when intact
    (collective: each rank checks a share of the files)."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        return str(e)
    if manifest is None:  # written before manifests: only its structure can be checked
        missing = [n for n in ("trainer_state.pt", "policy/.metadata") if not (path / n).is_file()]
        return f"{missing[0]}: missing" if missing else None
    files = manifest["files"]
    problems = _gather_shares(sorted(files), lambda name: _check_file(path, name, files[name]))
    bad = [problems[name] for name in sorted(problems) if problems[name]]
    if not bad:
        return None
    return bad[0] + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else "")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never deleted); returns the new path."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
        n += 1
    path.rename(target)
    fsync_dir(path.parent)
    return target


def resume_point(root: Path, *, report: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint under `root` (None: nothing to resume from); damaged newer
    ones are reported and set aside. Every checkpoint damaged: a UserError, nothing renamed."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            if _rank() == 0:
                for bad, why in damaged:
                    aside = set_aside(bad)
                    report(f"warning: checkpoint {bad} is damaged ({why}); set aside as "
                           f"{aside.name}, resuming from {path.name}")
            _barrier()
            return path
        damaged.append((path, problem))
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise UserError(f"checkpoint.resume=auto: no intact checkpoint in {root} ({listed}); "
                        "move them away to start afresh, or give checkpoint.resume=never")
    return None


# ---- save and load ---------------------------------------------------------------------------


def save_checkpoint(root: Path, step: int, policy: Any, trainer_state: dict[str, Any],
                    keep_last: int | None) -> Path:  # fmt: skip
    """Write step `step`'s checkpoint atomically and durably (collective); prune to
    `keep_last`."""
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    policy.save(tmp / "policy")
    if _rank() == 0:
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
    _barrier()  # every rank's shards are written before they are checksummed
    write_manifest(tmp, step)
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        if keep_last is not None:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_checkpoint(path: Path) -> None:
    """A one-line UserError unless `path` is a complete, intact checkpoint (collective)."""
    if not (path / COMPLETE).is_file():
        raise UserError(f"checkpoint.resume={path}: not a complete megarl checkpoint (no "
                        f"{COMPLETE} marker); give a step_* directory or 'auto'")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged ({problem}); give another step_* "
                        "directory, or checkpoint.resume=auto to use the newest intact one")


def load_checkpoint(path: Path, policy: Any, *, verified: bool = False) -> dict[str, Any]:
    """Restore the policy from `path` and return the trainer state (RNG states restored).

    The checkpoint is verified against its manifest first (`check_checkpoint`) unless the
    caller just did (``verified``)."""
    if not verified:
        check_checkpoint(path)
    policy.load(path / "policy")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
