"""megarl's train step against raw megatron-core on a Qwen3-30B-A3B-shaped slice (issue 8, item 2).

The slice: Qwen3-30B-A3B's real widths (hidden 2,048, 32 query heads, 4 KV groups of head dim
128, 128 experts top-8 of ffn 768, vocab 151,936, untied head) with as many decoder layers as
fit one GPU, at least 4. One GPU, world size 1, TP = EP = 1, bf16, megarl's model builder
(`transformer_config_from_hf` / `build_model` / `wrap_ddp` / `build_optimizer`, as
`megarl.megatron.policy.Policy` builds them). Every step trains the same packed micro-batches
(rows of exactly ``--seq-len`` tokens, 4,096 by default, several samples per row, the first
quarter of each sample a prompt that is not trained). Two iterations alternate on the same
model, optimizer and tokens:

* **megarl**: `megarl.megatron.step.train_step` exactly as `Policy.train` calls it: UP-GSPO
  (its default aggregation and parameters) on vocab-parallel log-probs and entropy from the
  model's ``output_processor``, global normalisers, unscaled grad finalisation, the finite
  check, Adam with grad clipping, the reduced metrics;
* **raw**: what Megatron-LM's ``pretrain_gpt`` does per iteration: ``zero_grad_buffer``, the
  same pipeline schedule with ``model(input_ids, position_ids, mask, labels=labels)`` (logits,
  then megatron-core's ``vocab_parallel_cross_entropy``), the masked token sum as the loss with
  the token count (``calculate_per_token_loss``), megatron's own ``finalize_model_grads``
  (divides by the tokens), and the same ``optimizer.step()``.

Both get the same block-causal attention mask and CPU-packed micro-batches moved to the GPU per
forward. Times are CUDA events around whole iterations (the optimizer step is marked inside
both), the median of ``--iters`` after ``--warmup``; the goal is megarl <= 1.05 x raw.

Model FLOPs per step (what tokens/s and TFLOP/s are reported against; recomputation and
megarl's logits recomputation in backward are not counted)::

    F = sum over micro-batches [ 6 * N_active * T  +  6 * L * n_heads * d_head * sum_i s_i^2 ]

``N_active`` = parameters a token's forward multiplies by (`megarl.memory_model.count_params(hf)
.active_compute`: attention, router, the 8 routed experts, the LM head; the input embedding is
a lookup), ``T`` tokens in the row, ``s_i`` the packed sequences' lengths. The first term is
2 FLOPs per multiply-add, times 3 for forward + backward; the second is causal attention
(``Q K^T`` and ``P V``, 2 * 2 * s^2 * n_heads * d_head per layer forward, halved by the causal
mask, times 3). megatron's local (non-TE) attention computes the full ``T x T`` scores of the
row, so the hardware does more attention work than counted (``hardware_attention_flops``).

Memory (why the default is 4 layers with full recomputation on an 80 GB H100). Per parameter:
bf16 weight 2 B + fp32 grad buffer 4 B (``grad_reduce_in_fp32``) + fp32 master copy 4 B + Adam
m and v 8 B = 18 B, and torch's foreach AdamW (no TE / Apex here) allocates one fp32 temporary
of the parameters in its step (+4 B). One layer has 623.1 M parameters (attention 18.9 M, router
0.26 M, 128 experts x 3 x 2048 x 768 = 604.0 M), embedding + head 622.3 M:

    4 layers: 3.115 B params x 18 B = 56.1 GB resident; optimizer step 56.1 + 12.5 + 3.2 = 71.7 GB
    5 layers: 3.738 B params x 18 B = 67.3 GB resident; optimizer step 67.3 + 15.0 + 3.2 = 85.5 GB

Activations of a 4,096-token row per layer: megatron's local attention keeps the fp32 softmax
and its bf16 copy, 6 B x 32 heads x 4096^2 = 3.2 GB, plus ~0.6 GB of linear / MoE activations
(top-8 copies of each token). Without recomputation 4 layers hold ~15.3 GB, so the forward /
backward peak is ~82 GB with megatron's score buffer (1.1 GB), the logits (~6 GB for its fp32
cross-entropy) and a 3 GiB reserve (CUDA context, fragmentation): over 90 % of the 80 GB card
(79.1 GiB = 84.9 GB usable). With ``recompute: full`` (the 30B recipe's setting) only each
layer's input is kept and the forward / backward peak is ~70 GB. 5 layers do not fit either way
(the optimizer step alone needs 85.5 GB). H100: 4 layers, full recomputation.
``--layers auto`` / ``--recompute auto`` (the defaults) take the most layers (>= 4) whose
estimate (`estimate_memory`) fits 90 % of the GPU with full recomputation, then drop
recomputation when that still fits (an H200 gets 8 layers, with recomputation).

    python benchmarks/train_step.py [--layers auto|N] [--recompute auto|none|full]
        [--seq-len 4096] [--micro-batches 4] [--iters 6] [--warmup 2] [--out PATH]
    python benchmarks/train_step.py --smoke [--out PATH]   # tiny shapes, CPU + gloo

Writes benchmarks/results/train_step-<date>.json and prints a table last; exits 1 when the
model check (raw cross-entropy == megarl's -log p on the same tokens) fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import GIB, Marks, summary  # noqa: E402

GOAL_RATIO = 1.05
SAFETY = 0.90  # of the GPU's memory the estimate may fill
RESERVE_BYTES = 3 * (1 << 30)  # CUDA context, allocator slack (megarl.memory_model's reserve)
STATE_BYTES_PER_PARAM = 18  # bf16 weight + fp32 grad + fp32 master + Adam m, v
ADAM_TEMP_BYTES_PER_PARAM = 4  # torch foreach AdamW: sqrt(v) temporary in the step


def qwen3_30b_a3b_slice(layers: int) -> dict[str, Any]:
    """Qwen3-30B-A3B's config.json (examples/configs/up_gspo_30b.yaml) with `layers` layers."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
        "initializer_range": 0.02,
    }  # fmt: skip


def smoke_config(layers: int = 2) -> dict[str, Any]:
    """The same architecture, tiny (CPU smoke runs)."""
    return qwen3_30b_a3b_slice(layers) | {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
    }  # fmt: skip


# ------------------------------------------------------------------------------ memory


def estimate_memory(hf: dict[str, Any], seq_len: int, recompute: str) -> dict[str, float]:
    """Bytes of a train step's peaks (the arithmetic of the module docstring)."""
    from megarl.memory_model import count_params

    counts = count_params(hf)
    params = counts.total
    h, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    heads, d = int(hf["num_attention_heads"]), int(hf["head_dim"])
    kv, k, ffn = int(hf["num_key_value_heads"]), int(hf["num_experts_per_tok"]), \
        int(hf["moe_intermediate_size"])
    vocab, t = int(hf["vocab_size"]), seq_len
    resident = params * STATE_BYTES_PER_PARAM
    # per layer: bf16 linear activations (norm inputs, q/k/v, context, projections; the MoE's
    # k permuted copies of each token through fc1 / activation / fc2) + the local attention's
    # fp32 softmax output and its bf16 copy for P V
    linear = t * (2 * (4 * h + 3 * heads * d + 2 * kv * d) + 2 * k * (2 * h + 3 * ffn))
    attention = 6 * heads * t * t
    layer = linear + attention
    score_buffer = 2 * heads * t * t  # megatron's global bf16 buffer for Q K^T
    backward_transient = 10 * heads * t * t  # fp32 grads of the softmax, bf16 grad of scores
    logits = 2 * t * vocab + 2 * 4 * t * vocab  # bf16 logits, fp32 copy and softmax (raw CE)
    if recompute == "full":
        stored = layers * t * h * 2 + layer  # each layer's input, one layer re-run in backward
    else:
        stored = layers * layer
    forward_backward = resident + stored + score_buffer + \
        max(logits, backward_transient) + RESERVE_BYTES
    optimizer_step = resident + params * ADAM_TEMP_BYTES_PER_PARAM + RESERVE_BYTES
    return {"params": float(params), "resident": float(resident),
            "activations": float(stored), "forward_backward_peak": float(forward_backward),
            "optimizer_step_peak": float(optimizer_step),
            "peak": float(max(forward_backward, optimizer_step))}


def choose_shape(layers: str, recompute: str, seq_len: int, gpu_bytes: float | None,
                 ) -> tuple[int, str, dict[str, float]]:  # fmt: skip
    """(layers, recompute, estimate): `auto` picks the most layers >= 4 that fit with full
    recomputation, then no recomputation if that still fits (module docstring)."""
    budget = SAFETY * gpu_bytes if gpu_bytes else \
        estimate_memory(qwen3_30b_a3b_slice(4), seq_len, "full")["peak"]  # no GPU: 4 layers
    if layers == "auto":
        n = 4
        while n < 48 and estimate_memory(qwen3_30b_a3b_slice(n + 1), seq_len,
                                         "full")["peak"] <= budget:
            n += 1
    else:
        n = int(layers)
    if recompute == "auto":
        none = estimate_memory(qwen3_30b_a3b_slice(n), seq_len, "none")["peak"]
        recompute = "none" if none <= budget else "full"
    return n, recompute, estimate_memory(qwen3_30b_a3b_slice(n), seq_len, recompute)


# ------------------------------------------------------------------------------ data


def make_samples(rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[Any]:
    """`rows` groups of samples whose lengths sum to exactly `seq_len` (lengths drawn from
    [seq_len/16, seq_len/4]); each sample's first quarter is prompt (not trained)."""
    import torch

    from megarl.policy_io import TrainSample

    g = torch.Generator().manual_seed(seed)
    lo, hi = max(4, seq_len // 16), max(8, seq_len // 4)
    samples = []
    for _ in range(rows):
        left = seq_len
        while left > 0:
            n = int(torch.randint(lo, hi + 1, (), generator=g))
            if left - n < lo:
                n = left
            left -= n
            prompt = max(1, n // 4)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[prompt:] = True
            samples.append(TrainSample(tokens=torch.randint(0, vocab, (n,), generator=g),
                                       loss_mask=mask,
                                       advantages=torch.randn((), generator=g)))
    return samples


def row_groups(samples: list[Any], seq_len: int) -> list[list[int]]:
    """`make_samples`' rows: consecutive samples whose lengths sum to `seq_len`."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(samples):
        if used + len(s.tokens) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(s.tokens)
    return groups


def with_old_logprobs(samples: list[Any], groups: list[list[int]], micro_batches: list[Any],
                      rows: list[Any], seed: int = 1) -> list[Any]:  # fmt: skip
    """Samples whose old log-probs are the model's own (as `Policy.logprobs` stores them) plus
    a little noise, so the importance ratios differ from 1."""
    import dataclasses

    import torch

    g = torch.Generator().manual_seed(seed)
    out = list(samples)
    for group, mb, row in zip(groups, micro_batches, rows, strict=True):
        logp = mb.unpack(row.float().cpu())
        for k, index in enumerate(group):
            s = samples[index]
            n = len(s.tokens)
            old = torch.zeros(n)
            old[1:] = logp[k][: n - 1] + 0.02 * torch.randn(n - 1, generator=g)
            out[index] = dataclasses.replace(s, old_logprobs=old)
    return out


def model_flops(hf: dict[str, Any], micro_batches: list[Any]) -> dict[str, float]:
    """Model FLOPs of one step (module docstring) and the attention work of the local
    implementation (full T x T per row)."""
    from megarl.memory_model import count_params

    n_active = count_params(hf).active_compute
    layers, heads, d = (int(hf[k]) for k in ("num_hidden_layers", "num_attention_heads",
                                              "head_dim"))
    dense = attention = hardware = 0.0
    for mb in micro_batches:
        t = mb.row_length
        dense += 6.0 * n_active * t
        attention += 6.0 * layers * heads * d * sum(float(s) ** 2 for s in mb.sample_lengths)
        hardware += 12.0 * layers * heads * d * float(t) ** 2
    return {"n_active_compute": float(n_active), "dense_flops": dense,
            "attention_flops": attention, "model_flops": dense + attention,
            "hardware_attention_flops": hardware}


# ------------------------------------------------------------------------------ the two steps


class MarkedOptimizer:
    """The optimizer with a mark before and after ``step()`` (both iterations call it once)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.marks: Marks | None = None

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.marks is not None:
            self.marks.mark("optimizer")
        out = self.optimizer.step(*args, **kwargs)
        if self.marks is not None:
            self.marks.mark("optimizer_done")
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


@contextlib.contextmanager
def megatron_finalize(models: list[Any]):
    """megatron's own ``finalize_model_grads`` (divides by the token count) for the raw
    iteration; megarl's unscaled one again afterwards."""
    from megatron.core.distributed import finalize_model_grads

    config = models[0].config
    saved = config.finalize_model_grads_func
    config.finalize_model_grads_func = finalize_model_grads
    try:
        yield
    finally:
        config.finalize_model_grads_func = saved


def raw_forward_step(data_iterator: Any, model: Any):
    """Megatron-LM's GPT forward step: logits -> megatron's vocab-parallel cross-entropy; the
    loss is the masked token sum, returned with the token count (calculate_per_token_loss)."""
    from functools import partial

    import torch

    from megarl.megatron.packing import block_causal_mask
    from megarl.megatron.step import on_model_device

    mb = on_model_device(next(data_iterator), model)
    t = mb.row_length
    positions = torch.arange(t, device=mb.input_ids.device).unsqueeze(0)
    output = model(mb.input_ids.unsqueeze(0), positions, block_causal_mask(mb.cu_seqlens, t),
                   labels=mb.labels.unsqueeze(0))

    def loss_func(mask: Any, losses: Any):
        mask = mask.float().view(-1)
        loss = torch.sum(losses.float().view(-1) * mask)
        tokens = mask.sum().to(torch.int)
        return loss, tokens, {"lm loss": torch.stack([loss.detach().clone(), tokens.float()])}

    return output, partial(loss_func, mb.loss_mask)


def raw_schedule(models: list[Any], micro_batches: list[Any], forward_only: bool) -> list[Any]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=raw_forward_step, data_iterator=iter(micro_batches), model=models,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.row_length for mb in micro_batches), micro_batch_size=1,
        forward_only=forward_only,
    )  # fmt: skip


def raw_iteration(models: list[Any], optimizer: Any, micro_batches: list[Any]) -> None:
    """Megatron-LM's train_step: zero grads, forward/backward schedule, optimizer step."""
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    with megatron_finalize(models):
        raw_schedule(models, micro_batches, forward_only=False)
    optimizer.step()


# ------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from megarl.config import AlgoConfig, ModelFacts, ParallelConfig, TrainerConfig
    from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp
    from megarl.megatron.optimizer import build_optimizer
    from megarl.megatron.packing import pack_groups
    from megarl.megatron.parallel import initialize_parallel
    from megarl.megatron.policy import start_distributed
    from megarl.megatron.step import (
        ForwardOptions,
        attach_schedule_hooks,
        compute_logprobs,
        train_step,
    )

    device = _common.pick_device(args.device)
    start_distributed()  # the CPU shim first when there is no GPU; one rank
    cuda = device.type == "cuda"
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if cuda else None
    if args.smoke:
        hf = smoke_config(int(args.layers) if args.layers != "auto" else 2)
        recompute = "full" if args.recompute == "auto" else args.recompute
        estimate = estimate_memory(hf, args.seq_len, recompute)
    else:
        layers, recompute, estimate = choose_shape(args.layers, args.recompute, args.seq_len,
                                                   gpu_bytes)
        hf = qwen3_30b_a3b_slice(layers)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    print(f"slice: {hf['num_hidden_layers']} layers, recompute={recompute}, {dtype}, estimated "
          f"peak {estimate['peak'] / 1e9:.1f} GB of "
          f"{(gpu_bytes or 0) / 1e9:.1f} GB", flush=True)

    parallel = ParallelConfig().resolve(1)
    initialize_parallel(parallel, ModelFacts.from_hf(hf), seed=1234)
    tconfig = transformer_config_from_hf(hf, parallel, dtype=dtype, recompute=recompute)
    chunks = build_model(tconfig, hf)
    models = wrap_ddp(chunks, tconfig)
    attach_schedule_hooks(models)
    trainer = TrainerConfig(lr=args.lr, grad_clip=1.0)
    optimizer = MarkedOptimizer(build_optimizer(models, trainer,
                                                params_dtype=tconfig.params_dtype))
    spec = AlgoConfig(loss="up_gspo").objective()
    options = ForwardOptions(temperature=1.0)

    samples = make_samples(args.micro_batches, args.seq_len, int(hf["vocab_size"]))
    groups = row_groups(samples, args.seq_len)
    mbs = pack_groups(samples, groups)
    assert len(mbs) == args.micro_batches and all(m.row_length == args.seq_len for m in mbs)
    # the same model and tokens: megatron's cross-entropy == megarl's -log p (initial weights)
    rows = compute_logprobs(models, mbs, options)
    logp_sum = sum(float((r.float().cpu() * m.loss_mask).sum()) for r, m in zip(rows, mbs,
                                                                               strict=True))
    tokens = sum(m.num_tokens for m in mbs)
    with torch.no_grad():
        ce = raw_schedule(models, mbs, forward_only=True)
    ce_mean = sum(float(d["lm loss"][0]) for d in ce) / tokens
    check = {"raw_cross_entropy": ce_mean, "megarl_minus_logp": -logp_sum / tokens}
    check["relative_difference"] = abs(check["raw_cross_entropy"] - check["megarl_minus_logp"]) \
        / abs(check["raw_cross_entropy"])
    check["tolerance"] = 1e-2 if dtype == "bfloat16" else 1e-4
    check["passed"] = check["relative_difference"] <= check["tolerance"]
    samples = with_old_logprobs(samples, groups, mbs, rows)
    mbs = pack_groups(samples, groups)

    def megarl_iteration() -> Any:
        for group in optimizer.param_groups:  # as Policy.train sets the step's lr
            group["lr"] = args.lr
        return train_step(models, optimizer, mbs, spec, options)

    def timed(which: str) -> dict[str, float]:
        marks = Marks(device)
        optimizer.marks = marks
        _common.peak_memory_reset(device)
        marks.mark("start")
        result = megarl_iteration() if which == "megarl" else \
            raw_iteration(models, optimizer, mbs)
        marks.mark("end")
        optimizer.marks = None
        stepped = "optimizer" in marks.points  # megarl skips the step on non-finite grads
        out = {"total_ms": marks.elapsed_ms("start", "end"),
               "forward_backward_ms": marks.elapsed_ms("start", "optimizer" if stepped
                                                       else "end"),
               "optimizer_ms": marks.elapsed_ms("optimizer", "optimizer_done") if stepped
               else float("nan"),
               "peak_gib": _common.peak_memory_gib(device) or float("nan")}
        if result is not None:
            out["skipped"] = float(result.skipped)
            out["loss"] = float(result.metrics.get("loss/total", float("nan")))
        return out

    for _ in range(args.warmup):  # the first steps allocate Adam's state
        timed("raw")
        timed("megarl")
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "megarl": []}
    for _ in range(args.iters):  # alternate, so drift hits both alike
        runs["raw"].append(timed("raw"))
        runs["megarl"].append(timed("megarl"))

    flops = model_flops(hf, mbs)
    step_tokens = sum(m.row_length for m in mbs)
    results: dict[str, Any] = {}
    for which, items in runs.items():
        total = summary([x["total_ms"] for x in items])
        seconds = total["median"] / 1e3
        results[which] = {
            "total_ms": total,
            "forward_backward_ms": summary([x["forward_backward_ms"] for x in items]),
            "optimizer_ms": summary([x["optimizer_ms"] for x in items]),
            "peak_memory_gib": max(x["peak_gib"] for x in items),
            "tokens_per_s": step_tokens / seconds,
            "model_tflops_per_s": flops["model_flops"] / seconds / 1e12,
            "iterations": items,
        }
    ratio = results["megarl"]["total_ms"]["median"] / results["raw"]["total_ms"]["median"]
    fb_ratio = results["megarl"]["forward_backward_ms"]["median"] / \
        results["raw"]["forward_backward_ms"]["median"]
    skipped = sum(x.get("skipped", 0.0) for x in runs["megarl"])
    return {
        "what": __doc__.splitlines()[0],
        "environment": _common.environment(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {"hf_config": hf, "layers": int(hf["num_hidden_layers"]), "dtype": dtype,
                   "recompute": recompute, "seq_len": args.seq_len,
                   "micro_batches": len(mbs), "tokens_per_step": step_tokens,
                   "loss_tokens_per_step": tokens,
                   "sequences_per_row": [len(m.sample_lengths) for m in mbs],
                   "sample_lengths": [list(m.sample_lengths) for m in mbs],
                   "tp": 1, "ep": 1, "pp": 1, "world_size": 1,
                   "loss": spec.name, "agg": spec.agg, "params": dict(spec.params),
                   "logprob_chunk_size": options.chunk_size,
                   "transformer_engine": _common.version("transformer-engine") is not None},
        "memory_estimate_gb": {k: v / 1e9 for k, v in estimate.items()},
        "gpu_memory_gib": (gpu_bytes or 0) / GIB,
        "flops": flops,
        "flops_formula": "6 * n_active_compute * T + 6 * layers * heads * head_dim * "
                         "sum_i s_i^2 per micro-batch (causal attention, fwd + bwd)",
        "model_check": check,
        "results": results,
        "ratio_megarl_over_raw": ratio,
        "ratio_forward_backward": fb_ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
        "megarl_skipped_updates": skipped,
    }


def table(record: dict[str, Any]) -> str:
    r, s = record["results"], record["shapes"]
    rows = []
    for which in ("raw", "megarl"):
        x = r[which]
        rows.append([which, f"{x['total_ms']['median']:.1f}",
                     f"{x['forward_backward_ms']['median']:.1f}",
                     f"{x['optimizer_ms']['median']:.1f}", f"{x['total_ms']['spread']:.1%}",
                     f"{x['tokens_per_s']:,.0f}", f"{x['model_tflops_per_s']:.1f}",
                     f"{x['peak_memory_gib']:.1f}"])
    head = (f"train step, {record['environment'].get('gpu') or 'CPU'}: {s['layers']} layers, "
            f"{s['micro_batches']} x {s['seq_len']} tokens, {s['dtype']}, recompute="
            f"{s['recompute']}; megarl / raw = {record['ratio_megarl_over_raw']:.3f} "
            f"(goal <= {GOAL_RATIO}: {'met' if record['goal_met'] else 'NOT met'}); "
            f"fwd+bwd ratio {record['ratio_forward_backward']:.3f}; model check "
            f"{'PASS' if record['model_check']['passed'] else 'FAIL'} "
            f"(rel {record['model_check']['relative_difference']:.1e})")
    return head + "\n\n" + _common.markdown_table(
        rows, ["step", "median ms", "fwd+bwd ms", "optimizer ms", "spread", "tokens/s",
               "model TFLOP/s", "peak GiB"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="auto", help="decoder layers, or auto (>= 4 that fit)")
    p.add_argument("--recompute", default="auto", choices=["auto", "none", "full"])
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (4096)")
    p.add_argument("--micro-batches", type=int, default=None, help="rows per step (4)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations of each (6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations of each (2)")
    p.add_argument("--lr", type=float, default=1e-7)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 on a GPU, float32 on the CPU")
    _common.add_common_args(
        p, "tiny model and rows (CPU + gloo without a GPU): the same code paths")
    return _common.finish("train_step", p.parse_args(argv), run, table,
                          lambda r: r["model_check"]["passed"],
                          smoke=dict(seq_len=64, micro_batches=2, iters=2, warmup=1),
                          full=dict(seq_len=4096, micro_batches=4, iters=6, warmup=2))


if __name__ == "__main__":
    sys.exit(main())
