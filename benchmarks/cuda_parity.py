"""The CPU suites' key checks on one GPU, in bf16 with bf16 tolerances (issue 8, item 1).

Four checks on a small Qwen3-MoE (a dense first layer, then MoE layers; GQA, qk-norm), each
through the code paths the CPU tests use (tests/distributed/conversion_cases.py and
replay_cases.py, megarl's model builder, weight map, step, routing replay and sync):

1. ``logits``: HF weights loaded into Megatron (`load_hf_weights`); Megatron's full-vocabulary
   logits against transformers' on the same tokens. In fp32 they must agree to 1e-4 (relative,
   TF32 off). In bf16 both are compared with an fp32 transformers reference: Megatron's error
   must be within twice transformers' own bf16 error (+1e-3) and under 5e-2.
2. ``r3``: the transformers engine (`HFEngine`, bf16) samples responses and returns every
   router's top-k; Megatron replays those routes (`RouteReplayer`) in its log-prob pass. Its
   log-probs are compared with an fp32 transformers forward forced onto the same routes: the
   mean error must be within twice the engine's own (+2e-3). Megatron's own routing (recorded as
   in R2) must choose the engine's expert set for >= 90 % of the (token, layer) routes in bf16
   (100 % in fp32), and the replayer's disagreement metric must be <= 10 %.
3. ``sync``: a replayed UP-GSPO train step changes the weights; `sync_weights` in small buckets
   (wake weights, one streamed load, wake KV cache) leaves every engine tensor bit-identical to
   Megatron's export, holds at most a bucket plus two tensors; fresh rollouts from the synced
   engine replay in Megatron within the r3 tolerance.
4. ``quickstart``: examples/configs/quickstart.yaml trained in this process on the device
   (bf16, ``trainer.steps=70``, the quickstart's peak lr held constant, as
   tests/unit/test_trainer.py runs it on the CPU): the mean reward of the last 10 steps must be
   >= the first 10's + 0.2 and no update skipped. With fewer than 30 steps (``--smoke``) the
   learning is reported, not judged.

    python benchmarks/cuda_parity.py [--dtype bfloat16] [--quickstart-steps 70] [--out PATH]
    python benchmarks/cuda_parity.py --smoke [--out PATH]   # tiny shapes, CPU + gloo

Writes benchmarks/results/cuda_parity-<date>.json and prints a table last; exits 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import ROOT  # noqa: E402

QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"
TEMPERATURE = 0.7

# "a small Qwen3-MoE": layer 0 dense, layers 1-3 MoE (16 experts, top-4), GQA 8:2, qk-norm
SMALL_QWEN3_MOE: dict[str, Any] = {
    "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 256,
    "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16,
    "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [0], "max_position_embeddings": 512, "tie_word_embeddings": False,
    "initializer_range": 0.1, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "attention_bias": False, "hidden_act": "silu",
}  # fmt: skip


def tiny_qwen3_moe() -> dict[str, Any]:
    """The CPU suites' tiny Qwen3-MoE (tests/distributed/conversion_cases.py) with the dense
    first layer of tests/distributed/tiny_moe.py."""
    from tests.distributed.conversion_cases import TINY_HF

    return dict(TINY_HF["qwen3_moe"]) | {"num_hidden_layers": 3, "mlp_only_layers": [0],
                                         "decoder_sparse_step": 1, "hidden_act": "silu"}


def rel(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ models


def megatron(hf: dict[str, Any], dtype: str, checkpoint: Any, *, replay: bool) -> list[Any]:
    """Megatron chunks (one rank) with the checkpoint's weights."""
    from megarl.config import ModelFacts, ParallelConfig
    from megarl.megatron.model import build_model, transformer_config_from_hf
    from megarl.megatron.parallel import initialize_parallel
    from megarl.megatron.weights import load_hf_weights

    parallel = ParallelConfig().resolve(1)
    initialize_parallel(parallel, ModelFacts.from_hf(hf), seed=7)
    tconfig = transformer_config_from_hf(hf, parallel, dtype=dtype, routing_replay=replay)
    models = build_model(tconfig, hf)
    load_hf_weights(models, checkpoint)
    return models


def transformers_model(path: Path, dtype: str, device: Any) -> Any:
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).to(device).eval()


# ------------------------------------------------------------------------------ 1. logits


def check_logits(path: Path, hf: dict[str, Any], dtype: str, device: Any, batch: int,
                 length: int) -> dict[str, Any]:  # fmt: skip
    import torch

    from megarl.convert.hf_io import HFCheckpoint
    from megarl.megatron.parallel import destroy_parallel
    from tests.distributed.conversion_cases import forward_logits

    checkpoint = HFCheckpoint(path)
    ids = torch.randint(0, hf["vocab_size"], (batch, length),
                        generator=torch.Generator().manual_seed(11)).to(device)
    with torch.no_grad():
        ref = transformers_model(path, "float32", device)(ids).logits.float()
        low = transformers_model(path, dtype, device)(ids).logits.float()
    fp32 = forward_logits(megatron(hf, "float32", checkpoint, replay=False), ids).float()
    destroy_parallel()
    mine = forward_logits(megatron(hf, dtype, checkpoint, replay=False), ids).float()
    destroy_parallel()
    out = {
        "fp32_rel": rel(fp32, ref), "fp32_max_abs": float((fp32 - ref).abs().max()),
        "megatron_rel": rel(mine, ref), "transformers_rel": rel(low, ref),
        "megatron_top1_agreement": float((mine.argmax(-1) == ref.argmax(-1)).float().mean()),
        "transformers_top1_agreement": float((low.argmax(-1) == ref.argmax(-1)).float().mean()),
        "tokens": batch * length, "dtype": dtype,
    }
    out["tolerance"] = {"fp32_rel": 1e-4,
                        "megatron_rel": min(2 * out["transformers_rel"] + 1e-3, 5e-2)}
    out["passed"] = out["fp32_rel"] <= 1e-4 and \
        out["megatron_rel"] <= out["tolerance"]["megatron_rel"]
    return out


# ------------------------------------------------------------------------------ 2. R3


def forced_logprobs(model: Any, samples: list[Any], device: Any) -> list[Any]:
    """Response log-probs of an un-cached transformers forward with every router forced onto
    the sample's recorded routes (replay_cases._forced, on any device)."""
    import torch

    from megarl.rollout.hf import _is_router

    routers = [m for m in model.modules() if _is_router(m)]
    out = []
    for s in samples:
        routes = s.routed_experts.long().to(device)
        hooks = []
        for i, router in enumerate(routers):
            def force(module, args, output, i=i, routes=routes):
                logits, ids = output[0], routes[:, i]
                scores = torch.softmax(logits.float().gather(-1, ids), -1).to(logits.dtype)
                return logits, scores, ids
            hooks.append(router.register_forward_hook(force))
        try:
            with torch.no_grad():
                logits = model(s.tokens[None].to(device)).logits[0]
        finally:
            for h in hooks:
                h.remove()
        logp = torch.log_softmax(logits.float() / TEMPERATURE, -1)[:-1]
        logp = logp.gather(-1, s.tokens[1:, None].to(device))[:, 0]
        out.append(logp[int(torch.nonzero(s.loss_mask)[0]) - 1:].cpu())
    return out


def errors(got: list[Any], want: list[Any]) -> dict[str, float]:
    import torch

    diff = torch.cat([(a.float().cpu() - b.float().cpu()).abs() for a, b in
                      zip(got, want, strict=True)])
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


def route_agreement(own: list[Any], engine: list[Any]) -> float:
    """Fraction of (token, layer) routes whose expert SETS agree (each sample's last token,
    never routed by the engine, left out)."""
    same = total = 0
    for a, b in zip(own, engine, strict=True):
        a, b = a[:-1].long().sort(-1).values, b[:-1].long().sort(-1).values
        same += int((a == b).all(-1).sum())
        total += a.shape[0] * a.shape[1]
    return same / total


def replayed_logprobs(models: list[Any], samples: list[Any], replayer: Any,
                      options: Any) -> list[Any]:  # fmt: skip
    from megarl.megatron.packing import make_micro_batches
    from megarl.megatron.step import compute_logprobs
    from tests.distributed.replay_cases import _response_logprobs

    mbs = make_micro_batches(samples, num_micro_batches=2)
    rows = compute_logprobs(models, mbs, options, replay=replayer)
    return [x.cpu() for x in _response_logprobs(rows, mbs, samples)]


def check_r3(path: Path, hf: dict[str, Any], dtype: str, device: Any, max_tokens: int,
             ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Check 2, then check 3 on the same models (sync after a replayed train step)."""
    from megarl.convert.hf_io import HFCheckpoint
    from megarl.convert.mapping import Architecture
    from megarl.megatron.packing import make_micro_batches
    from megarl.megatron.parallel import destroy_parallel
    from megarl.megatron.router_replay import RouteRecorder, RouteReplayer, sample_routes
    from megarl.megatron.step import ForwardOptions, compute_logprobs
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.hf import HFEngine
    from tests.distributed.replay_cases import PROMPTS, samples_of

    arch, topk = Architecture.from_hf(hf), int(hf["num_experts_per_tok"])
    engine = HFEngine(transformers_model(path, dtype, device), device=str(device))
    reference = transformers_model(path, "float32", device)
    batch = engine.generate(PROMPTS, SamplingParams(temperature=TEMPERATURE,
                                                    max_tokens=max_tokens, seed=123,
                                                    ignore_eos=True))
    samples = samples_of(batch, topk)
    engine_logp = [r.logprobs for r in batch.rollouts]
    truth = forced_logprobs(reference, samples, device)

    models = megatron(hf, dtype, HFCheckpoint(path), replay=True)
    replayer = RouteReplayer(models, arch.moe_layers, arch.num_experts, topk)
    options = ForwardOptions(temperature=TEMPERATURE, chunk_size=64)
    got = replayed_logprobs(models, samples, replayer, options)
    disagreement = replayer.last_metrics["router/replay_disagreement"]
    unreplayed = replayed_logprobs(models, samples, None, options)
    recorder = RouteRecorder(models, arch.moe_layers, arch.num_experts, topk)
    mbs = make_micro_batches(samples, num_micro_batches=2)
    compute_logprobs(models, mbs, options, replay=recorder)
    own = [r for mb, row in zip(mbs, recorder.take(mbs), strict=True)
           for r in sample_routes(mb, row)]
    r3 = {
        "replayed_vs_engine": errors(got, engine_logp),
        "replayed_vs_fp32_forced": errors(got, truth),
        "engine_vs_fp32_forced": errors(engine_logp, truth),
        "unreplayed_vs_engine": errors(unreplayed, engine_logp),
        "own_route_agreement": route_agreement(own, [s.routed_experts for s in samples]),
        "replay_disagreement": disagreement,
        "response_tokens": sum(len(x) for x in engine_logp), "dtype": dtype,
    }
    exact = dtype == "float32"
    r3["tolerance"] = {
        "replayed_vs_fp32_forced_mean": 1e-4 if exact else
        2 * r3["engine_vs_fp32_forced"]["mean_abs"] + 2e-3,
        "own_route_agreement": 1.0 if exact else 0.90,
        "replay_disagreement": 0.0 if exact else 0.10,
    }
    tol = r3["tolerance"]
    r3["passed"] = (r3["replayed_vs_fp32_forced"]["mean_abs"] <= tol["replayed_vs_fp32_forced_mean"]
                    and r3["own_route_agreement"] >= tol["own_route_agreement"]
                    and r3["replay_disagreement"] <= tol["replay_disagreement"])
    sync = check_sync(models, engine, hf, dtype, samples, engine_logp, replayer, options,
                      max_tokens, tol["replayed_vs_fp32_forced_mean"]
                      + r3["engine_vs_fp32_forced"]["mean_abs"])
    destroy_parallel()
    return r3, sync


# ------------------------------------------------------------------------------ 3. sync


def check_sync(models: list[Any], engine: Any, hf: dict[str, Any], dtype: str,
               samples: list[Any], engine_logp: list[Any], replayer: Any, options: Any,
               max_tokens: int, logp_tolerance: float) -> dict[str, Any]:  # fmt: skip
    import torch

    from megarl.config import AlgoConfig, TrainerConfig
    from megarl.megatron.model import wrap_ddp
    from megarl.megatron.optimizer import build_optimizer
    from megarl.megatron.packing import make_micro_batches
    from megarl.megatron.step import attach_schedule_hooks, train_step
    from megarl.megatron.weights import export_hf_weights
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.sync import sync_weights
    from tests.distributed.replay_cases import PROMPTS, _TrackedEngine, samples_of

    tconfig = models[0].config
    models = wrap_ddp(models, tconfig)
    attach_schedule_hooks(models)
    optimizer = build_optimizer(models, TrainerConfig(lr=1e-3), params_dtype=tconfig.params_dtype)
    trained = []
    for k, (s, logp) in enumerate(zip(samples, engine_logp, strict=True)):
        old = torch.zeros(len(s.tokens))
        old[len(s.tokens) - len(logp):] = logp
        trained.append(dataclasses.replace(s, old_logprobs=old,
                                           advantages=torch.tensor(1.0 if k % 2 else -1.0)))
    result = train_step(models, optimizer, make_micro_batches(trained, num_micro_batches=2),
                        AlgoConfig(loss="up_gspo").objective(), options,
                        replay=replayer)
    before = dict(engine.hf_tensors())
    changed = sum(not torch.equal(before[n], t) for n, t in export_hf_weights(models, hf))
    del before
    bucket = max(1 << 13, sum(t.numel() * t.element_size() for _, t in engine.hf_tensors())
                 // 16)  # ~16 buckets
    tracked = _TrackedEngine(engine, models)
    metrics = sync_weights(export_hf_weights(models, hf), tracked, bucket_bytes=bucket)
    mine = dict(engine.hf_tensors())
    exported = dict(export_hf_weights(models, hf))
    mismatched = sum(not torch.equal(mine[n], t) for n, t in exported.items() if n in mine)
    unmatched = len(set(mine) ^ set(exported))
    del mine, exported
    synced = engine.generate(PROMPTS, SamplingParams(temperature=TEMPERATURE,
                                                     max_tokens=max_tokens, seed=321,
                                                     ignore_eos=True))
    new = samples_of(synced, int(hf["num_experts_per_tok"]))
    got = replayed_logprobs(models, new, replayer, options)
    out = {
        "train_step_skipped": bool(result.skipped),
        "tensors_changed_by_step": changed,
        "mismatched_tensors": mismatched, "unmatched_names": unmatched,
        "buckets": metrics["sync/buckets"], "bucket_bytes": bucket,
        "bytes": metrics["sync/bytes"],
        "peak_live_bytes": tracked.peak, "largest_tensor_bytes": tracked.largest,
        "wake_order": tracked.calls,
        "synced_replay_vs_engine": errors(got, [r.logprobs for r in synced.rollouts]),
        "tolerance": {"synced_replay_vs_engine_mean": logp_tolerance}, "dtype": dtype,
    }
    out["passed"] = (not out["train_step_skipped"] and changed > 0 and mismatched == 0
                     and unmatched == 0 and out["buckets"] >= 2
                     and tracked.peak <= bucket + 2 * tracked.largest
                     and tracked.calls == ["wake:weights", "update", "wake:kv_cache"]
                     and out["synced_replay_vs_engine"]["mean_abs"] <= logp_tolerance)
    return out


# ------------------------------------------------------------------------------ 4. quickstart


def check_quickstart(steps: int, dtype: str, workdir: Path) -> dict[str, Any]:
    from megarl.config import load_config
    from megarl.megatron.parallel import destroy_parallel
    from megarl.trainer import Trainer

    destroy_parallel()
    overrides = [f"trainer.steps={steps}", "trainer.lr_schedule=constant", f"model.dtype={dtype}",
                 "trainer.eval_every=0", f"logging.dir={workdir}", "logging.run_name=quickstart",
                 "logging.sinks=[jsonl]", "checkpoint.resume=never"]
    config = load_config(QUICKSTART, overrides)
    start = time.perf_counter()
    history = Trainer(config).fit()
    seconds = time.perf_counter() - start
    destroy_parallel()
    rewards = [h["reward/mean"] for h in history]
    window = max(1, min(10, steps // 3))
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    judged = steps >= 30
    out = {
        "steps": len(history), "overrides": overrides, "seconds": seconds,
        "seconds_per_step": seconds / max(1, len(history)),
        "reward_first": first, "reward_last": last, "window": window, "rewards": rewards,
        "skipped_updates": sum(h.get("train/skipped_update", 0.0) for h in history),
        "logp_abs_diff_max": max(h.get("rollout/logp_abs_diff_max", 0.0) for h in history),
        "learning_judged": judged, "dtype": dtype,
        "tolerance": {"reward_gain": 0.2},
    }
    out["passed"] = len(history) == steps and out["skipped_updates"] == 0 and \
        (not judged or last >= first + 0.2)
    return out


# ------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from megarl.megatron.policy import start_distributed
    from tests.distributed.conversion_cases import write_checkpoint

    device = _common.pick_device(args.device)
    start_distributed()  # the CPU shim first when there is no GPU; one rank
    if device.type == "cuda":  # fp32 means fp32: no TF32 in the fp32 checks
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    hf = tiny_qwen3_moe() if args.smoke else SMALL_QWEN3_MOE
    checks: dict[str, Any] = {}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3_moe"
        write_checkpoint(path, hf)
        t0 = time.perf_counter()
        checks["logits"] = check_logits(path, hf, args.dtype, device, args.batch, args.length)
        timings["logits"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks["r3"], checks["sync"] = check_r3(path, hf, args.dtype, device, args.max_tokens)
        timings["r3+sync"] = time.perf_counter() - t0
        if args.quickstart_steps > 0:
            t0 = time.perf_counter()
            checks["quickstart"] = check_quickstart(args.quickstart_steps, args.dtype,
                                                    Path(tmp) / "runs")
            timings["quickstart"] = time.perf_counter() - t0
    return {
        "what": __doc__.splitlines()[0],
        "environment": _common.environment(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {"hf_config": hf, "dtype": args.dtype, "logits_tokens": args.batch * args.length,
                   "max_tokens": args.max_tokens, "quickstart_steps": args.quickstart_steps},
        "checks": checks,
        "seconds": timings,
        "passed": all(c["passed"] for c in checks.values()),
    }


def table(record: dict[str, Any]) -> str:
    c = record["checks"]
    rows = []
    lg = c["logits"]
    rows.append(["logits", "PASS" if lg["passed"] else "FAIL",
                 f"fp32 rel {lg['fp32_rel']:.1e} (<= 1e-4); {lg['dtype']} rel vs fp32 ref: "
                 f"megatron {lg['megatron_rel']:.1e}, transformers {lg['transformers_rel']:.1e} "
                 f"(<= {lg['tolerance']['megatron_rel']:.1e}); top-1 agreement "
                 f"{lg['megatron_top1_agreement']:.3f}"])
    r3 = c["r3"]
    rows.append(["r3", "PASS" if r3["passed"] else "FAIL",
                 f"mean abs logp vs fp32 forced: megatron "
                 f"{r3['replayed_vs_fp32_forced']['mean_abs']:.1e}, engine "
                 f"{r3['engine_vs_fp32_forced']['mean_abs']:.1e} (<= "
                 f"{r3['tolerance']['replayed_vs_fp32_forced_mean']:.1e}); vs engine "
                 f"{r3['replayed_vs_engine']['mean_abs']:.1e} replayed / "
                 f"{r3['unreplayed_vs_engine']['mean_abs']:.1e} own routes; own-route agreement "
                 f"{r3['own_route_agreement']:.3f}; disagreement {r3['replay_disagreement']:.3f}"])
    sy = c["sync"]
    rows.append(["sync", "PASS" if sy["passed"] else "FAIL",
                 f"{sy['mismatched_tensors']} of the tensors differ after the sync "
                 f"({sy['tensors_changed_by_step']} changed by the step), {sy['buckets']:.0f} "
                 f"buckets, peak live {_common.human_bytes(sy['peak_live_bytes'])}; synced "
                 f"rollouts replay to {sy['synced_replay_vs_engine']['mean_abs']:.1e} mean abs"])
    if "quickstart" in c:
        q = c["quickstart"]
        rows.append(["quickstart", "PASS" if q["passed"] else "FAIL",
                     f"{q['steps']} steps {q['dtype']}, reward {q['reward_first']:.2f} -> "
                     f"{q['reward_last']:.2f} ({q['window']}-step means"
                     f"{'' if q['learning_judged'] else ', not judged'}), "
                     f"{q['seconds_per_step']:.2f} s/step, logp diff max "
                     f"{q['logp_abs_diff_max']:.1e}"])
    head = (f"CUDA parity, {record['environment'].get('gpu') or 'CPU'}, "
            f"{record['shapes']['dtype']}: {'PASS' if record['passed'] else 'FAIL'}")
    return head + "\n\n" + _common.markdown_table(rows, ["check", "result", "numbers"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=None, help="logits check: sequences (4)")
    p.add_argument("--length", type=int, default=None, help="logits check: tokens each (256)")
    p.add_argument("--max-tokens", type=int, default=None, help="r3/sync: response tokens (32)")
    p.add_argument("--quickstart-steps", type=int, default=None,
                   help="quickstart steps (70; 0 skips it)")
    _common.add_common_args(p, "the CPU suites' tiny model, 3 quickstart steps (CPU + gloo "
                               "without a GPU): the same code paths")
    return _common.finish("cuda_parity", p.parse_args(argv), run, table, lambda r: r["passed"],
                          smoke=dict(batch=2, length=12, max_tokens=7, quickstart_steps=3),
                          full=dict(batch=4, length=256, max_tokens=32, quickstart_steps=70))


if __name__ == "__main__":
    sys.exit(main())
