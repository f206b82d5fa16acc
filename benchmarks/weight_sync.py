"""Megatron -> HF engine weight sync on one GPU against a plain device copy (issue 8, item 5).

The Qwen3-30B-A3B-shaped slice of benchmarks/train_step.py (real widths, 128 experts, vocab
151,936; 4 layers by default) is built with megarl's model builder in bf16 and wrapped in DDP as
the trainer holds it; the rollout engine is megarl's transformers engine (`HFEngine`) with the
same architecture in bf16 on the same GPU. Timed, each the median of ``--iters`` after
``--warmup`` (host clock between device synchronisations; the sync is host-driven):

* ``sync``: `megarl.rollout.sync.sync_weights` as the trainer calls it (wake the engine's
  weights, `export_hf_weights` streamed in buckets of ``--bucket-mb``, one `update_weights`,
  wake the KV cache), checked once: every engine tensor bit-identical to Megatron's afterwards;
* ``export only``: iterating `export_hf_weights` alone (gather, clone, split into HF tensors);
* ``engine load only``: `HFEngine.update_weights` of tensors exported beforehand;
* ``per-tensor copy``: ``dst.copy_(src)`` from those exported tensors into the engine's
  tensors, one launch per tensor (the floor of any per-tensor loader);
* ``flat copy``: one device-to-device copy of a buffer of the same byte count (CUDA events).

Rates are GB/s (1e9) of weight bytes delivered (a copy reads and writes each byte once, so
the memory traffic is twice that). Goal: sync >= 60 % of the flat copy's rate.

Projection for Qwen3-30B-A3B under examples/configs/up_gspo_30b.yaml (TP2 EP8, vLLM TP4) on 8
H100s (a 32-GPU run shards the same way per GPU): `megarl.memory_model` counts the bytes each GPU
handles in a sync, and time = bytes / measured sync rate. megarl's export gathers and
broadcasts every full tensor to every rank, so each GPU streams the whole model (30.5 B params,
61 GB in bf16) through its engine's loader; the projections for the Megatron shard a GPU holds
and for the vLLM shard it must receive are given beside it. Same-GPU rates only: the NCCL
all-gather / broadcast of a multi-GPU sync is not modelled.

    python benchmarks/weight_sync.py [--layers 4] [--bucket-mb 512] [--iters 5] [--out PATH]
    python benchmarks/weight_sync.py --smoke [--out PATH]   # tiny shapes, CPU + gloo

Writes benchmarks/results/weight_sync-<date>.json and prints a table last; exits 1 when the
synced engine differs from Megatron.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import ROOT, summary  # noqa: E402
from train_step import qwen3_30b_a3b_slice, smoke_config  # noqa: E402

GOAL_FRACTION = 0.60
RECIPE = ROOT / "examples" / "configs" / "up_gspo_30b.yaml"


def timed_host(fn: Any, device: Any, *, warmup: int, iters: int) -> list[float]:
    """Seconds of ``fn()`` between device synchronisations (host-driven work)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        _common.synchronize(device)
        start = time.perf_counter()
        fn()
        _common.synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def build(hf: dict[str, Any], dtype: str, device: Any) -> tuple[list[Any], Any]:
    """Megatron model chunks (DDP-wrapped, as the trainer holds them) and the HF engine."""
    import torch
    import transformers

    from megarl.config import ModelFacts, ParallelConfig
    from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp
    from megarl.megatron.parallel import initialize_parallel
    from megarl.megatron.policy import start_distributed
    from megarl.rollout.hf import HFEngine

    start_distributed()
    parallel = ParallelConfig().resolve(1)
    initialize_parallel(parallel, ModelFacts.from_hf(hf), seed=1234)
    tconfig = transformer_config_from_hf(hf, parallel, dtype=dtype)
    models = wrap_ddp(build_model(tconfig, hf), tconfig)
    cfg = transformers.AutoConfig.for_model(**hf)
    with torch.device(device):  # allocate (and initialise) on the GPU directly
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return models, HFEngine(model, device=str(device))


def mismatches(models: list[Any], engine: Any, hf: dict[str, Any]) -> tuple[int, int]:
    """(engine tensors not bit-identical to Megatron's export, names in only one of them)."""
    import torch

    from megarl.megatron.weights import export_hf_weights

    mine = dict(engine.hf_tensors())
    differ, seen = 0, set()
    for name, tensor in export_hf_weights(models, hf):
        seen.add(name)
        differ += int(name not in mine or not torch.equal(mine[name], tensor))
    return differ, len(seen ^ set(mine))


def projection(rate_gbps: float, copy_gbps: float) -> dict[str, Any]:
    """Sync time of Qwen3-30B-A3B under the 30B recipe's layout from the measured rates."""
    import dataclasses

    from megarl.config import load_config
    from megarl.memory_model import count_params, estimate_memory

    config = load_config(RECIPE)
    counts = count_params(config.model.known_config())
    p = config.parallel
    layout8 = dataclasses.replace(p, dp=None, world_size=None).resolve(8)
    megatron_shard = estimate_memory(config, layout8).local_params
    per_gpu = {
        "full_model_stream": counts.total * 2,  # megarl's export: every full tensor, every rank
        "megatron_shard": megatron_shard * 2,  # bf16 weights one GPU holds (TP2 / EP8)
        "engine_shard": counts.total * 2 / config.rollout.tp,  # what one vLLM TP4 rank keeps
    }
    return {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "layout": {"gpus": 8, "tp": p.tp, "ep": p.ep, "pp": p.pp, "etp": p.expert_tp,
                   "rollout_tp": config.rollout.tp, "recipe_world_size": p.world_size,
                   "recipe_layout": str(p.resolved())},
        "params_total": counts.total,
        "bytes_per_gpu": per_gpu,
        "seconds_at_measured_sync_rate": {k: v / (rate_gbps * 1e9) for k, v in per_gpu.items()},
        "seconds_at_flat_copy_rate": {k: v / (copy_gbps * 1e9) for k, v in per_gpu.items()},
        "not_modelled": "NCCL all-gather over TP/ETP and the broadcast from each tensor's owner "
                        "to every rank (megarl.megatron.weights.export_hf_weights)",
    }


def load_and_per_tensor_copy(models: list[Any], engine: Any, hf: dict[str, Any], device: Any,
                             warmup: int, iters: int) -> tuple[int, list[float], list[float]]:
    """(bytes, seconds of `update_weights` of tensors exported beforehand, seconds of one
    ``copy_`` per tensor into the engine's tensors); the exported copies are freed on return."""
    from megarl.megatron.weights import export_hf_weights
    from megarl.rollout.sync import nbytes

    pairs = [(n, t.clone()) for n, t in export_hf_weights(models, hf)]
    total = sum(nbytes(t) for _, t in pairs)
    load_s = timed_host(lambda: engine.update_weights(iter(pairs)), device,
                        warmup=warmup, iters=iters)
    slots = [(engine._slot(n), t) for n, t in pairs]

    def per_tensor_copy() -> None:
        for dst, src in slots:
            dst.copy_(src)

    return total, load_s, timed_host(per_tensor_copy, device, warmup=warmup, iters=iters)


def flat_copy_ms(total: int, device: Any, iters: int) -> list[float]:
    """Milliseconds of one device-to-device copy of `total` bytes (CUDA events)."""
    import torch

    src = torch.empty(total, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = _common.time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    if not torch.equal(dst, src):
        raise RuntimeError("the flat copy's destination differs from its source")
    return ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megarl.megatron.weights import export_hf_weights
    from megarl.rollout.sync import sync_weights

    device = _common.pick_device(args.device)
    cuda = device.type == "cuda"
    hf = smoke_config(args.layers) if args.smoke else qwen3_30b_a3b_slice(args.layers)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    bucket = int(args.bucket_mb * (1 << 20))
    models, engine = build(hf, dtype, device)

    before, _ = mismatches(models, engine, hf)
    metrics: dict[str, float] = {}

    def sync() -> None:
        metrics.update(sync_weights(export_hf_weights(models, hf), engine, bucket_bytes=bucket))

    sync()  # the first sync, then the check
    differ, unmatched = mismatches(models, engine, hf)
    check = {"differing_before_sync": before, "differing_after_sync": differ,
             "names_unmatched": unmatched, "buckets": metrics["sync/buckets"]}
    check["passed"] = before > 0 and differ == 0 and unmatched == 0
    sync_s = timed_host(sync, device, warmup=args.warmup, iters=args.iters)

    def export_only() -> None:
        for _ in export_hf_weights(models, hf):
            pass

    export_s = timed_host(export_only, device, warmup=args.warmup, iters=args.iters)
    total, load_s, per_tensor_s = load_and_per_tensor_copy(models, engine, hf, device,
                                                           args.warmup, args.iters)
    flat_ms = flat_copy_ms(total, device, args.copy_iters)

    def rate(seconds: list[float]) -> dict[str, Any]:
        s = summary(seconds)
        return {"seconds": s, "gbps": total / s["median"] / 1e9}

    rows = {"sync": rate(sync_s), "export_only": rate(export_s),
            "engine_load_only": rate(load_s), "per_tensor_copy": rate(per_tensor_s)}
    flat = summary([m / 1e3 for m in flat_ms])
    rows["flat_copy"] = {"seconds": flat, "gbps": total / flat["median"] / 1e9}
    fraction = rows["sync"]["gbps"] / rows["flat_copy"]["gbps"]
    return {
        "what": __doc__.splitlines()[0],
        "environment": _common.environment(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {"hf_config": hf, "layers": args.layers, "dtype": dtype,
                   "bucket_bytes": bucket, "bytes": total, "tensors": metrics["sync/tensors"],
                   "buckets": metrics["sync/buckets"],
                   "largest_bucket_bytes": metrics["sync/largest_bucket_bytes"],
                   "params": total // (2 if dtype == "bfloat16" else 4)},
        "check": check,
        "results": rows,
        "sync_fraction_of_flat_copy": fraction,
        "sync_fraction_of_per_tensor_copy": rows["sync"]["gbps"] / rows["per_tensor_copy"]["gbps"],
        "goal_fraction": GOAL_FRACTION,
        "goal_met": fraction >= GOAL_FRACTION,
        "flat_copy_memory_traffic_gbps": 2 * rows["flat_copy"]["gbps"],
        "projection_qwen3_30b_a3b": projection(rows["sync"]["gbps"], rows["flat_copy"]["gbps"]),
    }


def table(record: dict[str, Any]) -> str:
    r, s = record["results"], record["shapes"]
    rows = []
    for key, label in (("sync", "sync_weights (megarl)"), ("export_only", "export only"),
                       ("engine_load_only", "engine load only"),
                       ("per_tensor_copy", "per-tensor copy"), ("flat_copy", "flat copy")):
        x = r[key]
        rows.append([label, f"{x['seconds']['median'] * 1e3:.2f}",
                     f"{x['seconds']['spread']:.1%}", f"{x['gbps']:.1f}",
                     f"{x['gbps'] / r['flat_copy']['gbps']:.1%}"])
    proj = record["projection_qwen3_30b_a3b"]
    secs = proj["seconds_at_measured_sync_rate"]
    gb = {k: v / 1e9 for k, v in proj["bytes_per_gpu"].items()}
    head = (f"weight sync, {record['environment'].get('gpu') or 'CPU'}: {s['layers']} layers, "
            f"{_common.human_bytes(s['bytes'])} in {s['tensors']:.0f} tensors, "
            f"{s['buckets']:.0f} buckets of {_common.human_bytes(s['bucket_bytes'])}, "
            f"{s['dtype']}; sync = "
            f"{record['sync_fraction_of_flat_copy']:.1%} of the flat copy (goal >= "
            f"{GOAL_FRACTION:.0%}: {'met' if record['goal_met'] else 'NOT met'}); check "
            f"{'PASS' if record['check']['passed'] else 'FAIL'}")
    foot = (f"Qwen3-30B-A3B, {proj['recipe']} on 8 H100s (TP{proj['layout']['tp']} "
            f"EP{proj['layout']['ep']}, vLLM TP{proj['layout']['rollout_tp']}) at the measured "
            f"sync rate: full model through each rank {gb['full_model_stream']:.1f} GB -> "
            f"{secs['full_model_stream']:.2f} s; Megatron shard {gb['megatron_shard']:.1f} GB "
            f"-> {secs['megatron_shard']:.2f} s; vLLM shard {gb['engine_shard']:.1f} GB -> "
            f"{secs['engine_shard']:.2f} s (NCCL not modelled)")
    return head + "\n\n" + _common.markdown_table(
        rows, ["path", "median ms", "spread", "GB/s", "of flat copy"]) + "\n\n" + foot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the slice (4)")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="sync bucket (the recipes' rollout.sync_bucket_mb, 512)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--copy-iters", type=int, default=20)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 on a GPU, float32 on the CPU")
    _common.add_common_args(p, "tiny model (CPU + gloo without a GPU): the same code paths")
    return _common.finish("weight_sync", p.parse_args(argv), run, table,
                          lambda r: r["check"]["passed"],
                          smoke=dict(layers=2, bucket_mb=1 / 64, iters=2),
                          full=dict(layers=4, bucket_mb=512.0, iters=5))


if __name__ == "__main__":
    sys.exit(main())
