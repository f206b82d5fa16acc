"""MoE experts without Transformer-Engine: grouped GEMMs against megatron's SequentialMLP.

The routed experts of one Qwen3-30B-A3B MoE layer (128 experts, top-8, hidden 2048, moe ffn
768, bf16, SwiGLU) on a 4k-token micro-batch (32k routed tokens, routed by random router logits
as megatron's alltoall dispatcher hands them over: grouped by expert, counts on the CPU):

1. check: megarl's GroupedGemmExperts (torch._grouped_mm) vs megatron's SequentialMLP with the
   same weights, forward + backward, on a routing with empty experts; both against an fp32
   per-expert reference (bf16 tolerances: the grouped experts must be as accurate as
   SequentialMLP, and empty experts get exactly zero weight gradient);
2. time forward + backward (CUDA events after warm-up, median) of
   - ``sequential``: megatron's SequentialMLP (the local spec's experts),
   - ``grouped``: GroupedGemmExperts (megarl's default config: eager SwiGLU, as SequentialMLP),
   - ``grouped-fused-act``: the same with ``bias_activation_fusion`` (megatron's
     torch.compile'd weighted SwiGLU; SequentialMLP uses it too under that flag),
   - ``stacked-copy``: the rejected design: SequentialMLP's per-expert parameters
     ``torch.stack``-ed into grouped GEMMs at every forward (megarl/megatron/experts.py),
   - ``gemms-only``: just the grouped GEMMs (2 forward, 2 dgrad, 2 wgrad), no activation;
   and report ms, speed-up over SequentialMLP, the expert GEMMs' achieved TFLOP/s
   (6 * tokens * hidden * 3 * ffn per forward + backward) against the bf16 dense peak
   (H100 SXM: 989 TFLOP/s), and peak memory above the weights.

    python benchmarks/experts.py               # CUDA; writes benchmarks/results/experts-DATE.json
    python benchmarks/experts.py --smoke [--out PATH]  # tiny shapes, CPU or GPU, seconds
                                                         # (tests use it; writes only with --out)

Goal (issue 8): grouped >= 20x faster than SequentialMLP, expert GEMMs >= 40 % of bf16 peak.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (and this checkout's megarl onto sys.path)

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM5, dense (no sparsity)


def slice_config(experts: int, topk: int, hidden: int, ffn: int) -> dict[str, Any]:
    """One Qwen3-30B-A3B-shaped MoE layer as an HF config."""
    return {
        "model_type": "qwen3_moe", "vocab_size": 1024, "hidden_size": hidden,
        "intermediate_size": 3 * hidden, "moe_intermediate_size": ffn, "num_hidden_layers": 1,
        "num_attention_heads": 32 if hidden >= 2048 else 4, "num_key_value_heads": 4,
        "head_dim": 128 if hidden >= 2048 else hidden // 4, "num_experts": experts,
        "num_experts_per_tok": topk, "norm_topk_prob": True, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "hidden_act": "silu", "initializer_range": 0.02,
    }  # fmt: skip


# ---- setup ----------------------------------------------------------------------------------


def setup(hf: dict[str, Any], dtype: str):
    """torch.distributed (a world of one), megatron's groups and the TransformerConfig."""
    if not torch.cuda.is_available():
        from megarl.megatron import cpu

        cpu.install()
    from megarl.config import ModelFacts, ParallelConfig
    from megarl.megatron.model import transformer_config_from_hf
    from megarl.megatron.parallel import init_process_group, initialize_parallel

    init_process_group(timeout_s=300)
    initialize_parallel(ParallelConfig(), ModelFacts.from_hf(hf), seed=1234)
    return transformer_config_from_hf(hf, ParallelConfig(), dtype=dtype,
                                      use_transformer_engine=False)


def build(config, device: torch.device):
    """SequentialMLP and GroupedGemmExperts with the same weights (same seed, same init)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

    from megarl.megatron.experts import GroupedGemmExperts

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    n = config.num_moe_experts
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    seq = SequentialMLP(n, config, MLPSubmodules(ColumnParallelLinear, RowParallelLinear),
                        pg_collection=pgs)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    grp = GroupedGemmExperts(n, config, pg_collection=pgs, impl="grouped_mm")
    with torch.no_grad():  # equal by construction; made certain
        for j, expert in enumerate(seq.local_experts):
            grp.linear_fc1.weight[j].copy_(expert.linear_fc1.weight)
            grp.linear_fc2.weight[j].copy_(expert.linear_fc2.weight)
    return seq.to(device), grp.to(device)


def with_fused_activation(grp, config):
    """GroupedGemmExperts sharing `grp`'s weights, with megatron's fused weighted SwiGLU."""
    import dataclasses

    from megarl.megatron.experts import GroupedGemmExperts

    fused_config = dataclasses.replace(config, bias_activation_fusion=True,
                                       perform_initialization=False)
    fused = GroupedGemmExperts(grp.num_local_experts, fused_config, impl=grp.impl)
    fused.linear_fc1, fused.linear_fc2 = grp.linear_fc1, grp.linear_fc2
    return fused


def routing(tokens: int, experts: int, topk: int, hidden: int, dtype: torch.dtype,
            device: torch.device, empty: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tokens routed by random router logits (softmax over the top-k), permuted by expert as
    megatron's dispatcher hands them to the experts; `empty` experts get no token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    if empty:
        logits[:, torch.randperm(experts, generator=g)[:empty]] = -math.inf
    top, idx = logits.topk(topk, dim=-1)
    probs = torch.softmax(top, dim=-1)
    expert_of = idx.reshape(-1)
    order = torch.argsort(expert_of, stable=True)
    hidden_states = torch.randn(tokens, hidden, generator=g)
    return {
        "x": hidden_states[order // topk].to(dtype).to(device),
        "probs": probs.reshape(-1)[order].to(device),  # fp32, as the router's
        "tokens_per_expert": torch.bincount(expert_of, minlength=experts),  # on the CPU
        "dy": torch.randn(tokens * topk, hidden, generator=g).to(dtype).to(device),
    }


# ---- the variants ---------------------------------------------------------------------------


def run_module(module, r):
    """Forward + backward of an experts module; the input's and probs' gradients."""
    x = r["x"].detach().requires_grad_(True)
    p = r["probs"].detach().requires_grad_(True)
    out, _ = module(x, r["tokens_per_expert"], p)
    out.backward(r["dy"])
    return out, x.grad, p.grad


def run_stacked_copy(seq, grp, r):
    """The rejected design: SequentialMLP's per-expert parameters stacked at every forward."""
    from megarl.megatron.experts import expert_offsets, grouped_linear

    x = r["x"].detach().requires_grad_(True)
    p = r["probs"].detach().requires_grad_(True)
    w1 = torch.stack([e.linear_fc1.weight for e in seq.local_experts])
    w2 = torch.stack([e.linear_fc2.weight for e in seq.local_experts])
    offs = expert_offsets(r["tokens_per_expert"], x.device)
    out = grouped_linear(grp._activation(grouped_linear(x, w1, offs), p), w2, offs)
    out.backward(r["dy"])
    return out, x.grad, p.grad


def run_gemms_only(grp, r, act, fc1_grad):
    """Only the grouped GEMMs: fc1 and fc2 forward, their input and weight gradients (six
    GEMMs; `act` stands in for fc2's input, `fc1_grad` for the activation's gradient)."""
    from megarl.megatron.experts import expert_offsets, grouped_linear

    x = r["x"].detach().requires_grad_(True)
    offs = expert_offsets(r["tokens_per_expert"], x.device)
    fc1 = grouped_linear(x, grp.linear_fc1.weight, offs)
    out = grouped_linear(act, grp.linear_fc2.weight, offs)
    torch.autograd.backward([fc1, out], [fc1_grad, r["dy"]])
    return out


def reference_fp32(grp, r):
    """fp32 per-expert reference of the same math: (out, dx, dprobs, dw1, dw2)."""
    w1 = grp.linear_fc1.weight.detach().float().requires_grad_(True)
    w2 = grp.linear_fc2.weight.detach().float().requires_grad_(True)
    x = r["x"].detach().float().requires_grad_(True)
    p = r["probs"].detach().float().requires_grad_(True)
    counts = r["tokens_per_expert"].tolist()
    outs = []
    for e, (rows, pr) in enumerate(zip(torch.split(x, counts), torch.split(p, counts),
                                       strict=True)):  # fmt: skip
        gate, up = (rows @ w1[e].t()).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up * pr.unsqueeze(-1)) @ w2[e].t())
    out = torch.cat(outs)
    out.backward(r["dy"].float())
    return out, x.grad, p.grad, w1.grad, w2.grad


# ---- check ----------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(seq, grp, fused, config, tokens: int, topk: int, empty: int,
          device: torch.device) -> dict[str, Any]:
    """grouped (and grouped-fused-act) vs SequentialMLP vs an fp32 reference, fwd + bwd."""
    r = routing(tokens, config.num_moe_experts, topk, config.hidden_size, config.params_dtype,
                device, empty=empty, seed=1)
    ref = reference_fp32(grp, r)
    results = {}
    for name, module in (("sequential", seq), ("grouped", grp), ("grouped-fused-act", fused)):
        for p in [*seq.parameters(), *grp.parameters()]:
            p.grad = None
        out, dx, dp = run_module(module, r)
        if name == "sequential":
            dw1 = torch.stack([e.linear_fc1.weight.grad for e in seq.local_experts])
            dw2 = torch.stack([e.linear_fc2.weight.grad for e in seq.local_experts])
        else:
            dw1, dw2 = grp.linear_fc1.weight.grad.clone(), grp.linear_fc2.weight.grad.clone()
        results[name] = (out, dx, dp, dw1, dw2)
    keys = ("out", "dx", "dprobs", "dw1", "dw2")
    errs: dict[str, Any] = {"vs_fp32": {}, "grouped_vs_sequential": {},
                            "fused_act_vs_sequential": {}, "failed": []}
    # as accurate as SequentialMLP (bf16: ~4e-3 relative to fp32), and close to it
    tol = 1e-5 if config.params_dtype is torch.float32 else 2e-2
    for i, key in enumerate(keys):
        e = {name: rel(res[i], ref[i]) for name, res in results.items()}
        errs["vs_fp32"][key] = e
        for name, field in (("grouped", "grouped_vs_sequential"),
                            ("grouped-fused-act", "fused_act_vs_sequential")):
            between = rel(results[name][i], results["sequential"][i])
            errs[field][key] = between
            if not (e[name] <= 2 * e["sequential"] + tol / 10 and between <= tol):
                errs["failed"].append(f"{name}:{key}")
    counts = r["tokens_per_expert"]
    empty_ids = (counts == 0).nonzero().flatten().tolist()
    errs["empty_experts"] = len(empty_ids)
    errs["empty_expert_grad_max"] = max(
        [float(res[3][j].abs().max()) + float(res[4][j].abs().max())
         for name, res in results.items() if name != "sequential" for j in empty_ids] or [0.0])
    errs["passed"] = (not errs["failed"] and errs["empty_expert_grad_max"] == 0.0
                      and len(empty_ids) == empty)
    return errs


# ---- timing ---------------------------------------------------------------------------------


def timed(fn, params, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median / min ms of fn() (forward + backward), and its peak memory above the start (of
    the last timed call, on a GPU)."""
    cuda = device.type == "cuda"
    calls, base = 0, 0

    def reset():  # before every call: no gradients held; before the last, the memory baseline
        nonlocal calls, base
        for p in params:
            p.grad = None
        calls += 1
        if cuda and calls == warmup + iters:
            _common.synchronize(device)
            _common.peak_memory_reset(device)
            base = torch.cuda.memory_allocated(device)

    times = _common.time_ms(fn, device, warmup=warmup, iters=iters, reset=reset)
    row = {"ms": statistics.median(times), "ms_min": min(times), "iters": iters}
    if cuda:
        row["peak_mem_above_start_gib"] = (torch.cuda.max_memory_allocated(device) - base) / \
            _common.GIB
    return row


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    hf = slice_config(args.experts, args.topk, args.hidden, args.ffn)
    config = setup(hf, args.dtype)
    device = _common.pick_device(None)
    seq, grp = build(config, device)
    record: dict[str, Any] = {"what": __doc__.splitlines()[0], "args": vars(args) | {"out": None}}
    record["environment"] = _common.environment(device)
    routed = args.tokens * args.topk
    record["shapes"] = {"tokens": args.tokens, "routed_tokens": routed, "experts": args.experts,
                        "topk": args.topk, "hidden": args.hidden, "moe_ffn": args.ffn,
                        "dtype": args.dtype, "fc1_weight": list(grp.linear_fc1.weight.shape),
                        "fc2_weight": list(grp.linear_fc2.weight.shape)}
    fused = with_fused_activation(grp, config)
    record["check"] = check(seq, grp, fused, config, args.tokens, args.topk,
                            empty=args.empty_experts, device=device)
    r = routing(args.tokens, args.experts, args.topk, args.hidden, config.params_dtype, device)
    counts = r["tokens_per_expert"]
    record["routing"] = {"min": int(counts.min()), "max": int(counts.max()),
                         "mean": float(counts.float().mean()), "empty": int((counts == 0).sum())}
    act = torch.randn(routed, args.ffn, device=device, dtype=config.params_dtype,
                      requires_grad=True)
    fc1_grad = torch.randn(routed, grp.linear_fc1.weight.shape[1], device=device,
                           dtype=config.params_dtype)
    flops = 6 * routed * args.hidden * 3 * args.ffn  # (fc1 2F + fc2 F) x (fwd + dgrad + wgrad)
    variants = {
        "sequential": (lambda: run_module(seq, r), list(seq.parameters())),
        "grouped": (lambda: run_module(grp, r), list(grp.parameters())),
        "grouped-fused-act": (lambda: run_module(fused, r), list(grp.parameters())),
        "stacked-copy": (lambda: run_stacked_copy(seq, grp, r), list(seq.parameters())),
        "gemms-only": (lambda: run_gemms_only(grp, r, act, fc1_grad),
                       [*grp.parameters(), act]),
    }
    rows = {}
    for name, (fn, params) in variants.items():
        iters = max(2, args.iters // 4) if name == "sequential" else args.iters
        row = timed(fn, params, device, args.warmup, iters)
        row["gemm_tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        row["gemm_fraction_of_peak"] = row["gemm_tflops"] / args.peak_tflops
        rows[name] = row
        print(f"  {name}: {row['ms']:.3f} ms", file=sys.stderr, flush=True)
    base = rows["sequential"]["ms"]
    for row in rows.values():
        row["speedup_vs_sequential"] = base / row["ms"]
    record["gemm_flops_fwd_bwd"] = flops
    record["peak_tflops"] = args.peak_tflops
    record["timings"] = rows
    best = max(rows["grouped"]["speedup_vs_sequential"],
               rows["grouped-fused-act"]["speedup_vs_sequential"])
    record["goals"] = {
        "speedup_ge_20x": best >= 20,
        "gemms_ge_40pct_of_peak": rows["gemms-only"]["gemm_fraction_of_peak"] >= 0.40,
        "module_ge_40pct_of_peak": max(rows[k]["gemm_fraction_of_peak"]
                                       for k in ("grouped", "grouped-fused-act")) >= 0.40,
    }
    return record


def table(record: dict[str, Any]) -> str:
    s = record["shapes"]
    lines = [
        f"experts {s['experts']} top-{s['topk']}, hidden {s['hidden']}, moe ffn {s['moe_ffn']}, "
        f"{s['tokens']} tokens -> {s['routed_tokens']} routed, {s['dtype']}, on "
        f"{record['environment']['gpu'] or 'CPU'}",
        f"check: {'PASS' if record['check']['passed'] else 'FAIL'} (grouped vs sequential, "
        "relative: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                 record["check"]["grouped_vs_sequential"].items()) + ")",
        "| variant | fwd+bwd ms | vs SequentialMLP | expert-GEMM TFLOP/s | % of peak | peak mem |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in record["timings"].items():
        mem = r.get("peak_mem_above_start_gib")
        lines.append(f"| {name} | {r['ms']:.3f} | {r['speedup_vs_sequential']:.1f}x | "
                     f"{r['gemm_tflops']:.1f} | {100 * r['gemm_fraction_of_peak']:.1f} % | "
                     f"{'-' if mem is None else f'{mem:.2f} GiB'} |")
    lines.append("goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                       for k, v in record["goals"].items()))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few iterations (CPU or GPU): a test of the script")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--empty-experts", type=int, default=8,
                        help="experts given no token in the check phase")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/experts-DATE.json; "
                             "--smoke writes only here)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.experts, args.topk, args.hidden, args.ffn = 64, 8, 2, 64, 32
        args.empty_experts, args.warmup, args.iters = 2, 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("benchmarks/experts.py needs a CUDA GPU (or --smoke for tiny shapes)")
    return _common.finish("experts", args, benchmark, table, lambda r: r["check"]["passed"],
                          failure="check failed: grouped experts differ from SequentialMLP")


if __name__ == "__main__":
    sys.exit(main())
