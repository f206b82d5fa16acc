"""Log-probs and entropy of sampled tokens from vocabulary-parallel logits, chunked over tokens.

Why: the RL losses need ``log p(y_t)`` (and the entropy) of each sampled token, not the logits.
Materialising logits costs ``tokens x V`` floats (e.g. 64k tokens x 152k vocab x 4 B = 40 GB in
fp32), and gathering the vocabulary over tensor parallelism multiplies that by ``tp``. Here each
tensor-parallel rank keeps its output-weight shard ``W_r`` (``[V/tp, H]``, vocab ids
``[r V/tp, (r+1) V/tp)``), the vocabulary is never gathered, and tokens are processed in chunks
of ``c``: the extra memory is ``O(c * V/tp)`` in forward and backward, because the logits are
recomputed chunk by chunk in backward instead of being saved. Gradients are exact.

Per token with hidden ``h`` and temperature ``T`` (``z`` is fp32; ``max``/``sum`` over the whole
vocabulary are one all-reduce MAX and then one all-reduce SUM of ``[s, z_y, S]`` per chunk)::

    z     = (h W_r^T) / T                           local logits, [V/tp]
    m     = max_v z_v                               (no gradient: any shift gives the same lse)
    s     = sum_v exp(z_v - m),   lse = m + log s
    logp  = z_y - lse = (z_y - m) - log s           z_y is contributed by the rank owning y
    H     = -sum_v p_v log p_v = lse - E_p[z] = log s - S / s,   S = sum_v exp(z_v - m) (z_v - m)

Backward saves only ``h, W, y`` and per token the fp32 ``m``, ``log s`` (``lse`` in two parts, so
``log p = (z - m) - log s`` keeps full precision near the max) and ``H``, and recomputes ``z``::

    dlogp/dz = onehot(y) - p,                       p = exp(z - lse)
    dH/dz    = -p (z - E_p[z]) = -p (log p + H)
    dL/dh    = (dz / T) W_r         the PARTIAL gradient of rank r: the caller sums it over TP
    dL/dW_r  = (dz / T)^T h

Temperature is applied as the rollout engine applies it: vLLM's processed log-probs are
``log_softmax(logits / T)`` computed in fp32, which is ``logp`` above. Labels outside
``[0, V)`` are owned by no rank and give ``logp = -lse`` (meaningless): mask such positions.

Two implementations of the same function (``impl``; ``"auto"`` picks Triton for CUDA tensors
when triton imports, the torch path otherwise):

* ``"torch"``: token chunks of ``c``; each chunk's fp32 logits ``[c, V/tp]`` are materialised
  (from the matmul in the inputs' dtype) and reduced with torch ops, in forward and again in
  backward.
* ``"triton"`` (`megarl.megatron.fused_logprobs`): the logits are never materialised. Forward is
  one kernel producing per-token partial ``(m, s, S, z_y)`` from fp32 ``tl.dot`` accumulators
  (an online softmax over vocab blocks); the merge across vocab ranges and TP ranks is the same
  MAX / SUM all-reduce as above, over all tokens at once. Backward recomputes the logits tile by
  tile, writes ``dz / T`` for a chunk of vocab columns into a ``[N, w]`` scratch of about
  ``chunk_size * V/tp`` elements (the torch path's per-chunk size), and finishes with two
  matmuls per chunk (``dW`` rows written once, ``dh`` summed in fp32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "IMPLS",
    "LogProbContext",
    "logprob_entropy_output_processor",
    "vocab_parallel_logprobs",
]


def _group_size(group: dist.ProcessGroup | None) -> int:
    """World size of `group`; 1 when there is no group (single rank, no communication)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _chunk_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """fp32 ``(h W^T) / T`` for one chunk of tokens: ``[c, V_local]``."""
    z = (hidden @ weight.t()).float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _local_targets(labels: Tensor, vocab_start: int, vocab_local: int) -> tuple[Tensor, Tensor]:
    """(index of each label in this shard, clamped to it; mask of labels this rank owns)."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), owned


def _kernel_targets(labels: Tensor, vocab_start: int, vocab_local: int) -> Tensor:
    """int32 column of each label in this shard, -1 where this rank does not own it."""
    local, owned = _local_targets(labels, vocab_start, vocab_local)
    return torch.where(owned, local, -1).to(torch.int32)


IMPLS = ("auto", "torch", "triton")


@functools.cache
def _fused() -> ModuleType | None:
    """`megarl.megatron.fused_logprobs`, or None where triton does not import."""
    try:
        from megarl.megatron import fused_logprobs
    except ImportError:
        return None
    return fused_logprobs


def _resolve_impl(impl: str, hidden: Tensor) -> str:
    """"auto" -> "triton" for CUDA bf16 / fp16 / fp32 tensors when triton imports, else
    "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        kernel_dtype = hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
        impl = "triton" if hidden.is_cuda and kernel_dtype and _fused() is not None else "torch"
    if impl == "triton":
        fused = _fused()
        if fused is None:
            raise ValueError("impl='triton' needs triton, which does not import here")
        if not (hidden.is_cuda or fused.interpreting()):
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if hidden.numel() == 0:  # no tokens: nothing to launch
        return "torch"
    return impl


def _finish(m: Tensor, packed: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log s, logp, entropy or None) from the global max `m` and the summed ``[s, z_y, S]``
    (`packed`; S only with entropy)."""
    log_s = packed[0].log()
    logp = (packed[1] - m) - log_s
    # H = lse - E[z] = log s - E[z - m]: no cancellation between two large numbers.
    entropy = log_s - packed[2] / packed[0] if with_entropy else None
    return log_s, logp, entropy


def _fused_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Triton forward: (row_max, log_sum, logp, entropy or None) for all tokens at once."""
    targets = _kernel_targets(labels, vocab_start, weight.shape[0])
    part = _fused().local_partials(hidden, weight, targets, temperature, with_entropy)
    m_p, s_p, ent_p, z_y_p = part.unbind(0)  # each [n_splits, N]
    m = m_p.amax(dim=0)
    if _group_size(tp_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    # Rescale every range's sums to the global max (empty ranges have m_p = -1e30, s_p = 0).
    shift = m_p - m
    scale = shift.exp()
    stats = [(scale * s_p).sum(dim=0), z_y_p.sum(dim=0)]
    if with_entropy:
        stats.append((scale * (ent_p + s_p * shift)).sum(dim=0))
    packed = torch.stack(stats)
    if _group_size(tp_group) > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    log_s, logp, entropy = _finish(m, packed, with_entropy)
    return m, log_s, logp, entropy


def _torch_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float,
    chunk_size: int,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch forward, token chunk by chunk: (row_max, log_sum, logp, entropy; zeros without)."""
    n = hidden.shape[0]
    vocab_local = weight.shape[0]
    distributed = _group_size(tp_group) > 1
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    # lse = m + log s is kept as its two fp32 parts: z - m is exact where it matters (z near
    # the max) and log s <= log V is small, so log p = (z - m) - log s loses no precision.
    row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
    log_sum = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = _chunk_logits(hidden[start:end], weight, temperature)
        m = z.amax(dim=-1)
        if distributed:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        local, owned = _local_targets(labels[start:end], vocab_start, vocab_local)
        z_y = z.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill_(~owned, 0.0)
        z.sub_(m.unsqueeze(1))  # z - m <= 0 from here on
        e = z.exp()
        # One SUM all-reduce per chunk for [s, z_y, sum_v e_v (z_v - m)].
        stats = [e.sum(dim=-1), z_y]
        if with_entropy:
            stats.append(e.mul_(z).sum(dim=-1))
        del e, z
        packed = torch.stack(stats)
        if distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        log_s, lp, ent = _finish(m, packed, with_entropy)
        row_max[start:end] = m
        log_sum[start:end] = log_s
        logp[start:end] = lp
        if with_entropy:
            entropy[start:end] = ent
    return row_max, log_sum, logp, entropy


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """Fused ``linear -> log_softmax -> (log p(y), entropy)`` over vocab shards: the torch path
    (token chunks) or the Triton kernels (`impl`, already resolved to "torch" or "triton")."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        temperature: float,
        chunk_size: int,
        tp_group: dist.ProcessGroup | None,
        vocab_start: int,
        with_entropy: bool,
        impl: str,
    ) -> tuple[Tensor, Tensor]:
        if impl == "triton":
            row_max, log_sum, logp, entropy = _fused_forward(
                hidden, weight, labels, temperature, tp_group, vocab_start, with_entropy
            )
            if entropy is None:
                entropy = torch.zeros_like(logp)
        else:
            row_max, log_sum, logp, entropy = _torch_forward(
                hidden, weight, labels, temperature, chunk_size, tp_group, vocab_start,
                with_entropy,
            )  # fmt: skip

        ctx.save_for_backward(hidden, weight, labels, row_max, log_sum, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.vocab_start = vocab_start
        ctx.with_entropy = with_entropy
        ctx.impl = impl
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(
        ctx: Any, g_logp: Tensor | None, g_entropy: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, labels, row_max, log_sum, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 7
        if not ctx.with_entropy:
            g_entropy = None
        if (g_logp is None and g_entropy is None) or not (need_hidden or need_weight):
            return (None, None, *nones)

        n = hidden.shape[0]
        vocab_local = weight.shape[0]
        if ctx.impl == "triton":
            grad_hidden, grad_weight = _fused().backward(
                hidden, weight, _kernel_targets(labels, ctx.vocab_start, vocab_local),
                row_max, log_sum, entropy, g_logp, g_entropy, ctx.temperature,
                need_hidden, need_weight, ctx.chunk_size,
            )  # fmt: skip
            return (grad_hidden, grad_weight, *nones)
        inv_t = 1.0 / ctx.temperature
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            if need_hidden
            else None
        )
        # Accumulate the weight gradient over chunks in fp32 (one rounding at the end).
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight
            else None
        )

        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end]
            z = _chunk_logits(h, weight, ctx.temperature)
            # log p = (z - m) - log s, in place: z is not needed again.
            log_p = z.sub_(row_max[start:end].unsqueeze(1)).sub_(log_sum[start:end].unsqueeze(1))
            p = log_p.exp()
            if g_entropy is not None:
                # dH/dz = -p (log p + H), built in the log_p buffer.
                dz = log_p.add_(entropy[start:end].unsqueeze(1)).mul_(p)
                dz.mul_(g_entropy[start:end].unsqueeze(1) * -inv_t)
                if g_logp is not None:
                    dz.addcmul_(p, g_logp[start:end].unsqueeze(1), value=-inv_t)
                del p
            else:
                del log_p
                dz = p.mul_(g_logp[start:end].unsqueeze(1) * -inv_t)
            if g_logp is not None:
                local, owned = _local_targets(labels[start:end], ctx.vocab_start, vocab_local)
                g_y = (g_logp[start:end] * inv_t).masked_fill_(~owned, 0.0)
                dz.scatter_add_(1, local.unsqueeze(1), g_y.unsqueeze(1))
            dlogits = dz.to(weight.dtype)
            del dz
            if grad_hidden is not None:
                torch.matmul(dlogits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                if dlogits.dtype == torch.float32:
                    grad_weight.addmm_(dlogits.t(), h)
                else:  # low-precision matmul (fp32 accumulation inside), fp32 running sum
                    grad_weight.add_(dlogits.t() @ h)
            del dlogits

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return (grad_hidden, grad_weight, *nones)


def vocab_parallel_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    with_entropy: bool = True,
    impl: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(log p(labels), entropy)`` of ``softmax((hidden @ W^T) / T)`` over the full vocab.

    `hidden` is ``[..., H]``, `labels` ``[...]`` global vocab ids, `weight` this rank's shard
    ``[V/tp, H]`` starting at `vocab_start` (default ``tp_rank * V/tp``). The gradient returned
    for `hidden` is this rank's partial sum over its vocab shard: sum it over `tp_group` (e.g.
    with megatron's ``copy_to_tensor_model_parallel_region`` before the call). Entropy is None
    when `with_entropy` is False. `impl` is "auto" (Triton kernels for CUDA tensors when triton
    imports, else the torch path), "torch" or "triton" (see the module docstring).
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() < 1 or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V_local, {hidden.shape[-1]}] to match hidden, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    impl = _resolve_impl(impl, hidden)
    if vocab_start is None:
        rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
        vocab_start = rank * weight.shape[0]

    lead = labels.shape
    logp, entropy = _VocabParallelLogProbEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).long(),
        float(temperature),
        int(chunk_size),
        tp_group,
        int(vocab_start),
        bool(with_entropy),
        impl,
    )
    return logp.view(lead), (entropy.view(lead) if with_entropy else None)


@dataclass
class LogProbContext:
    """Settings for `logprob_entropy_output_processor` (``output_processor_context``)."""

    temperature: float = 1.0
    chunk_size: int = 1024
    with_entropy: bool = True
    impl: str = "auto"  # "auto" | "torch" | "triton", see vocab_parallel_logprobs


def logprob_entropy_output_processor(
    *,
    hidden_states: Tensor,
    output_layer: Any,
    output_weight: Tensor | None,
    labels: Tensor | None,
    context: LogProbContext | None,
    config: Any,
    **_: Any,
) -> Tensor:
    """``GPTModel.forward(output_processor=...)``: fp32 ``[b, s, 2]`` of (log p(labels), entropy).

    `hidden_states` is ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism), `labels`
    ``[b, s]``. Hidden states are brought to the full sequence as ``ColumnParallelLinear`` does,
    so their gradient is summed over TP in backward (all-gather / reduce-scatter with sequence
    parallelism, identity / all-reduce without). MuP's output multiplier ``k`` (logits * k) is
    folded into the temperature: ``(k z) / T = z / (T / k)``.
    """
    # Imported here: megatron.core takes seconds to import, the pure function above needs none.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    ctx = context if context is not None else LogProbContext()
    if labels is None:
        raise ValueError("labels must be given to compute log-probs (got None)")
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError("output_layer has a bias, which the chunked log-prob path does not add")
    weight = output_weight if output_weight is not None else output_layer.weight

    tp_group = getattr(output_layer, "tp_group", None)
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = _group_size(tp_group)
    if tp_size > 1:
        sequence_parallel = getattr(output_layer, "sequence_parallel", config.sequence_parallel)
        if sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=tp_group
            )
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        vocab_start = dist.get_rank(tp_group) * weight.shape[0]
    else:
        vocab_start = 0

    temperature = ctx.temperature
    mup_mult = getattr(config, "mup_output_mult", 1.0) if getattr(config, "use_mup", False) else 1.0
    if mup_mult != 1.0:
        temperature = temperature / mup_mult

    s, b, h = hidden_states.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels must be [b, s] = {(b, s)}, got {tuple(labels.shape)}")
    if hidden_states.dtype != weight.dtype:
        hidden_states = hidden_states.to(weight.dtype)
    logp, entropy = vocab_parallel_logprobs(
        hidden_states.reshape(s * b, h),  # megatron's s-major token order
        weight,
        labels.t().reshape(s * b),
        temperature=temperature,
        chunk_size=ctx.chunk_size,
        tp_group=tp_group if tp_size > 1 else None,
        vocab_start=vocab_start,
        with_entropy=ctx.with_entropy,
        impl=ctx.impl,
    )
    if entropy is None:
        entropy = torch.zeros_like(logp)
    return torch.stack((logp, entropy), dim=-1).view(s, b, 2).transpose(0, 1).contiguous()
