"""What every GPU benchmark shares: the environment record, timing, JSON and the table.

Each benchmark writes one JSON record under ``benchmarks/results/`` (``<name>-<date>.json``;
``--smoke`` runs write only where ``--out`` says) holding ``environment()`` (GPU name, versions,
date, git commit or a digest of the sources when the tree has no ``.git``, as on the device
machine), its arguments and shapes, its raw numbers and the markdown ``table`` it prints last
(``finish`` / ``publish``). Importable without CUDA and without megatron-core.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run as a script from anywhere: this checkout's megarl
    sys.path.insert(0, str(ROOT))

GIB = float(1 << 30)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    """HEAD and whether the tree differs from it; without git (the device machine gets a copy
    of the tree, no .git), ``MEGARL_GIT_COMMIT`` if set and a digest of the tracked sources."""
    out: dict[str, Any] = {"commit": os.environ.get("MEGARL_GIT_COMMIT"), "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=10)
            out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    out["source_digest"] = source_digest()
    return out


def source_digest() -> str:
    """sha256 over megarl/ and benchmarks/ Python sources (names and contents), 16 hex digits:
    identifies the code that ran where git is not available."""
    h = hashlib.sha256()
    for folder in ("megarl", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def environment(device: Any = None) -> dict[str, Any]:
    """GPU (or CPU), versions, date and code version of this run."""
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "triton": version("triton"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        **git_commit(),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            device="cuda",
            gpu=torch.cuda.get_device_name(dev),
            gpu_memory_gib=round(props.total_memory / GIB, 2),
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda_driver=_nvidia_smi("driver_version"),
        )
    else:
        env.update(device="cpu", gpu=None)
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def pick_device(requested: str | None) -> Any:
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------ timing


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Named points in time on the device's stream: CUDA events on a GPU (read after one
    synchronize), the host clock on the CPU. ``elapsed_ms(a, b)`` between two marks."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.points: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[name] = event
        else:
            self.points[name] = time.perf_counter()

    def elapsed_ms(self, start: str, end: str) -> float:
        a, b = self.points[start], self.points[end]
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b))
        return (b - a) * 1e3


def time_ms(fn: Callable[[], Any], device: Any, *, warmup: int, iters: int,
            reset: Callable[[], Any] | None = None) -> list[float]:
    """``iters`` timings of ``fn()`` in milliseconds (device events), after ``warmup`` calls;
    ``reset()``, when given, runs before every call of ``fn`` (warm-up ones too), untimed."""
    for _ in range(warmup):
        if reset is not None:
            reset()
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        if reset is not None:
            reset()
        marks = Marks(device)
        marks.mark("start")
        fn()
        marks.mark("end")
        out.append(marks.elapsed_ms("start", "end"))
    return out


def summary(samples: Sequence[float]) -> dict[str, float]:
    """median / min / max / relative spread ((max - min) / median) of timings."""
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples),
            "spread": (max(samples) - min(samples)) / med if med else 0.0, "n": len(samples)}


def peak_memory_reset(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: Any) -> float | None:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return None


def live_bytes() -> Any:
    """A fresh CPU stand-in for ``max_memory_allocated``: ``with live_bytes() as tracker: ...``,
    then ``tracker.peak``, the peak bytes of tensor storages created inside and still alive."""
    return _live_bytes_mode()()


@functools.cache
def _live_bytes_mode() -> type:
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        """Peak bytes of tensor storages created while the mode is active.

        CPU has no ``max_memory_allocated``. Every aten op (forward, and backward: the autograd
        engine runs CPU backward on this thread with the mode active) passes through
        ``__torch_dispatch__``; each output's storage is recorded with a weak reference, which
        expires when the storage's data is freed. After each op, expired storages are dropped and
        the live total is compared with the peak, so the peak is the high-water mark at op
        boundaries (an op's output counted while its inputs are still alive), over storages
        allocated inside the mode: extra memory, excluding the inputs that existed before. Views
        and in-place results share a storage and are counted once. (A weak reference keeps the
        storage object, not its data, so a freed storage's address is not reused while it is
        tracked.)
        """

        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    ref = StorageWeakRef(storage)
                    old = self.live.get(ref.cdata, (ref, 0))[1]
                    self.live[ref.cdata] = (ref, max(old, storage.nbytes()))
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
            return out

    return LiveBytes


# ------------------------------------------------------------------------------ output


def human_bytes(n: float | None, *, binary: bool = False) -> str:
    """Bytes with a decimal unit (6.23 GB, 512.00 kB) or, ``binary``, a binary one (5.80 GiB);
    None as ``-``."""
    if n is None:
        return "-"
    units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if binary else \
        (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    for unit, size in units:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def result_path(name: str, date: str, out: Path | None, smoke: bool) -> Path | None:
    """Where the record goes: ``--out``, else ``benchmarks/results/<name>-<day>.json`` (a smoke
    run without ``--out`` writes nothing)."""
    if out is not None:
        return out
    if smoke:
        return None
    return RESULTS / f"{name}-{date[:10]}.json"


def write_record(record: dict[str, Any], path: Path | None) -> None:
    """Write the JSON (``NaN``/``inf`` as null) and say where."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(record), indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def add_common_args(parser: argparse.ArgumentParser, smoke_help: str) -> None:
    """``--device``, ``--out`` and ``--smoke`` (its help ``smoke_help``), last on the command line
    of every GPU benchmark (``publish`` reads ``out`` and ``smoke``)."""
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)


def publish(name: str, record: dict[str, Any], table: Callable[[dict[str, Any]], str],
            args: argparse.Namespace, date: str) -> None:
    """The record's ``table``, the JSON where ``result_path`` says (``args.out``, ``args.smoke``),
    then the table, printed last."""
    record["table"] = table(record)
    write_record(record, result_path(name, date, args.out, args.smoke))
    print(record["table"], flush=True)


def finish(name: str, args: argparse.Namespace,
           run: Callable[[argparse.Namespace], dict[str, Any]],
           table: Callable[[dict[str, Any]], str], passed: Callable[[dict[str, Any]], bool], *,
           smoke: dict[str, Any] | None = None, full: dict[str, Any] | None = None,
           failure: str | None = None) -> int:
    """The end of a benchmark's ``main()``: arguments still None take the ``smoke`` (with
    ``--smoke``) or ``full`` defaults; then ``quiet()``, ``run(args)`` -> the record (its
    ``environment()`` under ``"environment"``), ``publish`` it, and the exit status: 0 when
    ``passed(record)``, else 1 (``failure`` said on stderr)."""
    for key, value in ((smoke if args.smoke else full) or {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    quiet()
    record = run(args)
    publish(name, record, table, args, record["environment"]["date"])
    if passed(record):
        return 0
    if failure:
        print(failure, file=sys.stderr, flush=True)
    return 1


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def quiet() -> None:
    """Silence megatron's and transformers' per-model warnings and log records."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
