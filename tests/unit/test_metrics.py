"""Metric kinds, cross-rank reduction (real 2-process gloo) and the sinks."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarl.config import LoggingConfig
from megarl.errors import UserError
from megarl.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricAccumulator,
    TensorBoardSink,
    WandbSink,
    make_sinks,
    metric_kind,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ratio/min", "min"),
        ("ratio/max", "max"),
        ("tokens/sum", "sum"),
        ("count/clipped", "sum"),
        ("loss/policy", "sum"),
        ("loss", "mean"),
        ("clip/frac", "mean"),
        ("minimum", "mean"),
        ("x/maximum", "mean"),
        ("recount/x", "mean"),
    ],
)
def test_kind_from_name(name: str, kind: str) -> None:
    assert metric_kind(name) == kind


def test_single_process_reduction() -> None:
    acc = MetricAccumulator()
    acc.add({"loss": 1.0, "ratio/min": 0.9, "ratio/max": 1.1, "count/tokens": 3}, weight=1)
    acc.add({"loss": torch.tensor(4.0), "ratio/min": 0.5, "ratio/max": torch.tensor(1.3),
             "count/tokens": torch.tensor(5)}, weight=torch.tensor(3))
    out = acc.reduce()
    assert out["loss"] == pytest.approx((1 * 1 + 4 * 3) / 4)
    assert out["ratio/min"] == pytest.approx(0.5)
    assert out["ratio/max"] == pytest.approx(1.3)
    assert out["count/tokens"] == 8
    assert all(isinstance(v, float) for v in out.values())


def test_zero_weight_mean_is_nan_and_reset() -> None:
    acc = MetricAccumulator()
    acc.add({"entropy": 2.0}, weight=0)
    assert math.isnan(acc.reduce()["entropy"])
    acc.reset()
    assert len(acc) == 0 and acc.reduce() == {}


def test_non_scalar_tensor_is_rejected() -> None:
    with pytest.raises(ValueError, match="scalar"):
        MetricAccumulator().add({"loss": torch.ones(2)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        acc = MetricAccumulator()
        if rank == 0:
            acc.add({"loss": 1.0, "ratio/min": 0.8, "ratio/max": 1.2, "count/tokens": 10}, 10)
            acc.add({"loss": 3.0, "ratio/min": 0.9, "ratio/max": 1.1, "count/tokens": 30}, 30)
        else:
            acc.add({"loss": torch.tensor(5.0), "ratio/min": torch.tensor(0.7),
                     "ratio/max": 1.05, "count/tokens": 60, "only/on/rank1/sum": 2.0}, 60)
        out = acc.reduce()
        same = MetricAccumulator()
        same.add({"x": float(rank), "x/max": float(rank)}, weight=rank + 1)
        out_same = same.reduce(same_names=True)
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"union": out, "same": out_same}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_reduction(tmp_path: Path) -> None:
    mp.spawn(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # every rank gets the same answer
    out = results[0]["union"]
    assert out["loss"] == pytest.approx((1 * 10 + 3 * 30 + 5 * 60) / 100)
    assert out["ratio/min"] == pytest.approx(0.7)
    assert out["ratio/max"] == pytest.approx(1.2)
    assert out["count/tokens"] == 100
    assert out["only/on/rank1/sum"] == 2.0
    same = results[0]["same"]
    assert same["x"] == pytest.approx((0 * 1 + 1 * 2) / 3)
    assert same["x/max"] == 1.0


def test_jsonl_sink_appends_one_object_per_step(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"loss": 0.5, "count/tokens": 7.0})
    # flushed per step: readable before close
    assert json.loads(path.read_text().splitlines()[0])["loss"] == 0.5
    sink.log(2, {"loss": float("nan")})
    sink.close()
    again = JsonlSink(path)
    again.log(3, {"loss": 0.25})
    again.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["count/tokens"] == 7.0
    assert records[1]["loss"] is None
    assert records[2]["loss"] == 0.25
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_sink_resumed_drops_steps_after_the_checkpoint_and_a_torn_line(
        tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 6):
        sink.log(step, {"loss": float(step)})
    sink.close()
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    resumed = JsonlSink(path, resume_step=3)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_tensorboard_sink_writes_a_readable_event_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.log(1, {"loss": 0.5, "ratio/max": 1.25})
    sink.log(2, {"loss": 0.25})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "ratio/max"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("ratio/max")] == [(1, 1.25)]


def test_console_sink_prints_one_line_per_step() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    sink = ConsoleSink(Console(file=buffer, width=200, no_color=True))
    sink.log(3, {"loss": 0.123456, "count/tokens": 12.0, "weird[x]": 1.5})
    lines = buffer.getvalue().strip().splitlines()
    assert lines == ["step 3  loss 0.1235  count/tokens 12  weird[x] 1.5"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pip install 'megarl\[wandb\]'"):
        WandbSink("megarl", tmp_path)
    with pytest.raises(UserError, match=r"megarl\[wandb\]"):
        make_sinks(LoggingConfig(sinks=["wandb"]), tmp_path, rank=0)


def test_make_sinks_builds_the_configured_sinks_on_rank_zero(tmp_path: Path) -> None:
    sinks = make_sinks(LoggingConfig(sinks=["console", "jsonl", "tensorboard"]), tmp_path, rank=0)
    assert [type(s) for s in sinks] == [ConsoleSink, JsonlSink, TensorBoardSink]
    for s in sinks:
        s.log(1, {"loss": 1.0})
        s.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert make_sinks(LoggingConfig(sinks=["jsonl"]), tmp_path / "r1", rank=1) == []
    assert not (tmp_path / "r1").exists()


def test_a_steps_updates_combine_by_kind_and_skip_the_skipped() -> None:
    """Across a step's optimizer updates: max of maxima, min of minima, sum of counts, mean of
    the rest; a skipped update adds only its count (issue 18: ``train_step`` used to average
    every metric, ``ratio/max`` and ``count/tokens`` included, and NaNs of a skipped update
    leaked into the step)."""
    from megarl.metrics import combine_updates

    first = {"ratio/max": 2.0, "ratio/min": 0.5, "count/tokens": 10.0, "loss/policy": 0.2,
             "entropy/mean": 1.0, "train/num_tokens": 10.0, "train/skipped_update": 0.0}
    second = {"ratio/max": 3.0, "ratio/min": 0.7, "count/tokens": 30.0, "loss/policy": 0.4,
              "entropy/mean": 3.0, "train/num_tokens": 30.0, "train/skipped_update": 0.0}
    skipped = {"ratio/max": math.nan, "count/tokens": 5.0, "loss/policy": math.nan,
               "train/grad_norm": math.nan, "train/skipped_update": 1.0}
    both = combine_updates([first, second])
    assert both == {"ratio/max": 3.0, "ratio/min": 0.5, "count/tokens": 40.0,
                    "loss/policy": pytest.approx(0.3), "entropy/mean": 2.0,
                    "train/num_tokens": 40.0, "train/skipped_update": 0.0}
    with_skip = combine_updates([first, skipped, second])
    assert with_skip["train/skipped_update"] == 1.0 and with_skip["count/tokens"] == 40.0
    assert with_skip["ratio/max"] == 3.0 and not any(math.isnan(v) for v in with_skip.values()
                                                       if isinstance(v, float))
    all_skipped = combine_updates([skipped, skipped])
    assert all_skipped["train/skipped_update"] == 2.0 and math.isnan(all_skipped["ratio/max"])


@pytest.mark.parametrize("name", ["up_gspo", "dgpo", "grpo"])
def test_loss_metrics_do_not_depend_on_the_micro_batch_split(name: str) -> None:
    """Per-region means (grad_weight/*, up/cap_*, dgpo/*) carry their own token counts, so one
    micro-batch and eight give the same step metrics (the trainer weights by loss tokens)."""
    from megarl.losses import compute_policy_loss

    g = torch.Generator().manual_seed(0)
    rows, width = 16, 12
    old = -torch.rand(rows, width, generator=g) * 2
    logp = (old + 0.4 * torch.randn(rows, width, generator=g)).requires_grad_()
    adv = torch.randn(rows, 1, generator=g).expand(rows, width)
    mask = torch.rand(rows, width, generator=g) > 0.3
    counts = {"num_tokens": int(mask.sum()), "num_sequences": rows}

    def step_metrics(parts: int) -> dict[str, float]:
        acc = MetricAccumulator()
        for idx in torch.arange(rows).chunk(parts):
            _, m = compute_policy_loss(name, logp[idx], old[idx], adv[idx], mask[idx], **counts)
            acc.add(m, weight=int(mask[idx].sum()))
        return acc.reduce()

    whole, split = step_metrics(1), step_metrics(8)
    assert not any(k.endswith("@weight") for k in whole)
    regional = [k for k in whole if k.startswith(("grad_weight/", "up/cap", "dgpo/"))]
    assert regional
    for k in regional + ["region/HP", "clip/frac", "ratio/mean"]:
        assert split[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k
