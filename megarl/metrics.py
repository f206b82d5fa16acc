"""Metrics: accumulate per micro-batch, reduce across ranks, write to sinks.

Reduction kind is inferred from the metric's name:

========================================  =====================================
name                                      reduced as
========================================  =====================================
ends with ``/min``                        minimum over micro-batches and ranks
ends with ``/max``                        maximum over micro-batches and ranks
ends with ``/sum``, or starts with        sum over micro-batches and ranks
``count/`` or ``loss/``                   (``loss/*`` are shares of a global loss:
                                          megarl.losses normalises each micro-batch
                                          by the mini-batch's global counts)
anything else                             weighted mean (weight = the ``weight``
                                          given with the micro-batch, e.g. its
                                          token count, or the metric's own
                                          ``name@weight`` when it has one)
========================================  =====================================

Weights only matter for means. A mean whose total weight is 0 is NaN, except a conditional
mean (one given with ``name@weight``: a mean over a subset of tokens), which is 0 over no tokens.

Across ranks, ``MetricAccumulator.reduce`` packs every value into two float64 tensors and
runs two all-reduces: SUM (weighted sums, weights, sums) and MAX (maxima, and negated
minima). Ranks may report different metric names: the names are first unioned with one
``all_gather_object`` (pass ``same_names=True`` to skip it when every rank is known to report
the same names).

Sinks (console, progress, jsonl, tensorboard, wandb) are written by rank 0 only;
``make_sinks`` returns no sinks on other ranks.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from rich.markup import escape

from megarl.errors import UserError
from megarl.losses.batch import WEIGHT_SUFFIX

Kind = Literal["mean", "sum", "min", "max"]
Number = float | int | torch.Tensor


def metric_kind(name: str) -> Kind:
    """The reduction of metric ``name`` (see the module docstring)."""
    if name.endswith("/min"):
        return "min"
    if name.endswith("/max"):
        return "max"
    if name.endswith("/sum") or name.startswith(("count/", "loss/")):
        return "sum"
    return "mean"


_UPDATE_COUNTS = ("train/skipped_update", "train/undone_update")


def combine_updates(updates: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One step's metrics from its optimizer updates' (each already global over micro-batches
    and ranks), by kind across updates: minimum of minima, maximum of maxima, sum of counts
    (``count/*``, ``*/sum``, ``train/num_*``, ``train/skipped_update`` and
    ``train/undone_update``: skipped and undone updates in the step), mean of the rest (a
    ``loss/*`` total is per update, so its mean). A skipped update (``train/skipped_update`` 1)
    contributes only its count: the step reports the good updates, or all of them when every
    update was skipped."""
    good = [u for u in updates if not u.get("train/skipped_update")] or list(updates)
    out: dict[str, float] = {}
    for name in dict.fromkeys(n for u in updates for n in u):
        every = name in _UPDATE_COUNTS
        counted = name.startswith(("count/", "train/num_")) or name.endswith("/sum") or every
        values = [float(u[name]) for u in (updates if every else good) if name in u]
        if not values:
            continue
        kind = metric_kind(name)
        if counted:
            out[name] = float(sum(values))
        elif kind == "min":
            out[name] = min(values)
        elif kind == "max":
            out[name] = max(values)
        else:
            out[name] = sum(values) / len(values)
    return out


class MetricAccumulator:
    """Collects scalar metrics from micro-batches; ``reduce`` combines them over ranks."""

    def __init__(self) -> None:
        self._values: dict[str, list[Number]] = defaultdict(list)
        self._weights: dict[str, list[Number]] = defaultdict(list)
        self._conditional: set[str] = set()  # means with their own weights (name@weight)

    def add(self, metrics: Mapping[str, Number], weight: Number = 1.0) -> None:
        """Record one micro-batch's scalars (floats or 0-d tensors) with its weight; a mean
        that comes with ``name@weight`` (`megarl.losses.batch.conditional_mean`) is weighted by
        that instead."""
        for name, value in metrics.items():
            if name.endswith(WEIGHT_SUFFIX):
                continue
            own = metrics.get(name + WEIGHT_SUFFIX)
            if own is not None:
                self._conditional.add(name)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"metric {name!r} must be a scalar, got {tuple(value.shape)}")
                value = value.detach()
            self._values[name].append(value)
            self._weights[name].append(weight if own is None else own)

    def reset(self) -> None:
        self._values.clear()
        self._weights.clear()
        self._conditional.clear()

    def __len__(self) -> int:
        return len(self._values)

    def reduce(
        self, group: dist.ProcessGroup | None = None, same_names: bool = False
    ) -> dict[str, float]:
        """Combine everything added (on every rank of ``group`` when distributed is up)."""
        distributed = dist.is_available() and dist.is_initialized()
        names = sorted(self._values)
        if distributed and not same_names:
            gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, names, group=group)
            names = sorted({n for ns in gathered for n in (ns or [])})
        device = comm_device(group) if distributed else torch.device("cpu")

        sum_names = [n for n in names if metric_kind(n) in ("mean", "sum")]
        max_names = [n for n in names if metric_kind(n) in ("min", "max")]
        sums = torch.zeros(2 * len(sum_names), dtype=torch.float64, device=device)
        maxes = torch.full((len(max_names),), -math.inf, dtype=torch.float64, device=device)
        for i, name in enumerate(sum_names):
            if name not in self._values:
                continue
            values = _stack(self._values[name], device)
            if metric_kind(name) == "mean":
                weights = _stack(self._weights[name], device)
                sums[2 * i] = (values * weights).sum()
                sums[2 * i + 1] = weights.sum()
            else:
                sums[2 * i] = values.sum()
        for i, name in enumerate(max_names):
            if name not in self._values:
                continue
            values = _stack(self._values[name], device)
            maxes[i] = values.max() if metric_kind(name) == "max" else -values.min()

        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        sums_list, maxes_list = sums.tolist(), maxes.tolist()

        out: dict[str, float] = {}
        for i, name in enumerate(sum_names):
            total, weight = sums_list[2 * i], sums_list[2 * i + 1]
            if metric_kind(name) == "sum":
                out[name] = total
            else:
                empty = 0.0 if name in self._conditional else math.nan  # over no tokens: 0
                out[name] = total / weight if weight != 0 else empty
        for i, name in enumerate(max_names):
            out[name] = maxes_list[i] if metric_kind(name) == "max" else -maxes_list[i]
        return dict(sorted(out.items()))


def _stack(values: list[Number], device: torch.device) -> torch.Tensor:
    """A float64 vector on ``device`` from floats and 0-d tensors (one host sync at most)."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]
    )


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live to be communicated over `group` (CUDA for NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------------


class MetricSink(Protocol):
    """Where reduced metrics go, once per step."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """One rich line per step: ``step 3  loss 0.1234  reward/mean 0.5 ...``."""

    def __init__(self, console: Any = None, keys: list[str] | None = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.keys = keys

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        names = self.keys if self.keys is not None else list(metrics)
        parts = [f"[bold]step {step}[/bold]"]
        parts += [f"{escape(n)} [cyan]{_fmt(metrics[n])}[/cyan]" for n in names if n in metrics]
        self.console.print("  ".join(parts), highlight=False)

    def close(self) -> None:
        pass


class ProgressSink:
    """A rich progress bar over the run's steps, with the headline metrics beside it (for
    interactive runs such as the quickstart; ``console`` prints every metric instead)."""

    KEYS = (("reward/mean", "reward"), ("response/length_mean", "len"),
            ("entropy/mean", "entropy"), ("time/step", "s/step"))

    def __init__(self, total: int, start: int = 0, console: Any = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[summary]}"), console=console)
        self.task = self.progress.add_task("train", total=total, completed=start, summary="")
        self.progress.start()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        summary = "  ".join(f"{label} {_fmt(metrics[name])}" for name, label in self.KEYS
                            if name in metrics)
        evals = [f"{name.removeprefix('eval/')} {_fmt(v)}" for name, v in metrics.items()
                 if name.startswith(("eval/mean/avg@", "eval/mean/greedy@"))]
        self.progress.update(self.task, completed=step, summary="  ".join([summary, *evals]))

    def close(self) -> None:
        self.progress.stop()


class JsonlSink:
    """Appends ``{"step": .., "time": .., <metrics>}`` per step; non-finite values become null.

    ``resume_step`` drops the records after that step first (a resumed run repeats the steps
    after its checkpoint, so the file holds every step once).
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            _keep_records_through(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for name, value in metrics.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _keep_records_through(path: Path, step: int) -> None:
    """Rewrite a jsonl metrics file (atomically) without the records after ``step``; a torn
    last line from a killed run is dropped too."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


class TensorBoardSink:
    """Scalars to a TensorBoard event file in ``log_dir``; ``resume_step`` purges the events
    after it."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases; needs the ``wandb`` extra."""

    def __init__(
        self,
        project: str,
        run_dir: str | Path,
        name: str | None = None,
        entity: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "the wandb metrics sink needs wandb: pip install 'megarl[wandb]'"
            ) from None
        self.run = wandb.init(
            project=project, entity=entity, name=name, dir=str(run_dir),
            config=dict(config or {}),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_sinks(
    logging_config: Any,
    run_dir: str | Path,
    config_dict: Mapping[str, Any] | None = None,
    rank: int | None = None,
    resume_step: int | None = None,
) -> list[MetricSink]:
    """The sinks named in ``logging_config.sinks``, writing under ``run_dir`` (rank 0 only).

    jsonl -> ``run_dir/metrics.jsonl``, tensorboard -> ``run_dir/tensorboard/``. A run resumed
    from step ``resume_step`` first drops what those sinks logged after it.
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        return []
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = []
    for name in logging_config.sinks:
        if name == "console":
            sinks.append(ConsoleSink())
        elif name == "progress":
            total = int((config_dict or {}).get("trainer", {}).get("steps", 0)) or None
            sinks.append(ProgressSink(total, start=max(resume_step or 0, 0)))
        elif name == "jsonl":
            sinks.append(JsonlSink(run_dir / "metrics.jsonl", resume_step))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
        elif name == "wandb":
            sinks.append(WandbSink(logging_config.wandb_project, run_dir,
                                   name=logging_config.run_name,
                                   entity=logging_config.wandb_entity, config=config_dict))
        else:
            raise UserError(f"unknown metrics sink {name!r}")
    return sinks


def log_to_sinks(sinks: list[MetricSink], step: int, metrics: Mapping[str, float]) -> None:
    for sink in sinks:
        sink.log(step, metrics)


def _fmt(value: float) -> str:
    if value != value or value in (math.inf, -math.inf):
        return str(value)
    if value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"
