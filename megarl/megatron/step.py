"""One optimizer step and the forward-only log-prob pass, on megatron's pipeline schedules.

Both share `make_forward_step`: a packed micro-batch -> model inputs for this rank (CP slice,
THD or block-causal mask) -> GPTModel with the vocab-parallel log-prob/entropy
``output_processor`` -> a loss closure. ``train_step`` adds the global normalisers
(`megarl.megatron.loss`), the optimizer step with grad clipping, and skips the update when the
gradients are not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megarl.losses.objective import Objective
from megarl.megatron.logprobs import LogProbContext, logprob_entropy_output_processor
from megarl.megatron.loss import (
    GlobalCounts,
    finalize_grads_unscaled,
    gather_from_context_parallel,
    global_counts,
    policy_loss_share,
)
from megarl.megatron.packing import (
    PackedMicroBatch,
    block_causal_mask,
    cp_partition_index,
    pad_row,
)
from megarl.megatron.parallel import data_parallel_group
from megarl.megatron.router_replay import RouteRecorder, RouteReplayer
from megarl.metrics import MetricAccumulator, comm_device
from megarl.policy_io import StepResult


@dataclass(frozen=True)
class ForwardOptions:
    """How log-probs are computed: as the rollout engine computed them."""

    temperature: float = 1.0
    chunk_size: int = 1024  # tokens per vocab-parallel log-prob chunk (Triton: scratch size)
    # "torch" | "triton" | "auto" (Triton on CUDA): see logprobs.py (model.logprob_kernel)
    logprob_impl: str = "torch"
    thd: bool = False  # Transformer-Engine THD packing; False = block-causal mask (local spec)


def attach_schedule_hooks(models: list[Any]) -> None:
    """Point the schedule at DDP's no_sync and at the unscaled grad finalisation."""
    config = models[0].config
    config.finalize_model_grads_func = finalize_grads_unscaled
    no_sync = [m.no_sync for m in models]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None


def model_inputs(mb: PackedMicroBatch, options: ForwardOptions) -> dict[str, Any]:
    """This rank's slice of a packed row, as GPTModel arguments (batch dim 1)."""
    cp, length = ps.get_context_parallel_world_size(), mb.row_length
    positions = torch.arange(length, device=mb.input_ids.device)
    if cp > 1:
        positions = cp_partition_index(mb.cu_seqlens, cp, ps.get_context_parallel_rank())
    inputs: dict[str, Any] = {
        "input_ids": mb.input_ids[positions].unsqueeze(0),
        "labels": mb.labels[positions].unsqueeze(0),
        "position_ids": positions.unsqueeze(0),
    }
    if options.thd:
        cu = mb.cu_seqlens.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        inputs["attention_mask"] = None
        inputs["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=max_len, max_seqlen_kv=max_len,
        )  # fmt: skip
    else:
        if cp > 1:
            raise ValueError("context parallelism needs THD packing (Transformer-Engine)")
        inputs["attention_mask"] = block_causal_mask(mb.cu_seqlens, length)
        inputs["packed_seq_params"] = None
    return inputs


def make_forward_step(
    options: ForwardOptions,
    loss_closure: Callable[[PackedMicroBatch, Tensor], tuple],
    replay: RouteReplayer | RouteRecorder | None = None,
) -> Callable:
    """`forward_step_func` for megatron's schedules; `loss_closure(mb, output)` -> 3-tuple.

    With `replay` (R3), the micro-batch's routes are installed in this chunk's routers for
    its forward (see `megarl.megatron.router_replay`).
    """
    context = LogProbContext(
        temperature=options.temperature, chunk_size=options.chunk_size, impl=options.logprob_impl
    )

    def forward_step(data_iterator: Iterator[PackedMicroBatch], model: torch.nn.Module):
        mb = on_model_device(next(data_iterator), model)
        inputs = model_inputs(mb, options)
        if replay is not None:
            replay.before_forward(mb, model)
        output = model(
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["attention_mask"],
            labels=inputs["labels"],
            packed_seq_params=inputs["packed_seq_params"],
            output_processor=logprob_entropy_output_processor,
            output_processor_context=context,
        )
        if replay is not None:
            replay.after_forward(model)
        return output, partial(loss_closure, mb)

    return forward_step


def on_model_device(mb: PackedMicroBatch, model: torch.nn.Module) -> PackedMicroBatch:
    """`mb` on the device of `model`'s parameters: micro-batches are packed on the CPU and
    moved per forward (a no-op on CPU runs)."""
    device = next(model.parameters()).device
    return mb if mb.input_ids.device == device else mb.to(device)


def whole_rows(mb: PackedMicroBatch, output: Tensor) -> tuple[Tensor, Tensor]:
    """``[1, t_local, 2]`` processor output -> whole-row ``[T]`` log-probs and entropy."""
    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    rows = gather_from_context_parallel(output[0], mb.cu_seqlens.to(output.device), cp_group)
    return rows[:, 0], rows[:, 1]


def _run_schedule(
    models: list[Any], micro_batches: list[PackedMicroBatch], forward_step: Callable,
    forward_only: bool, force_all_reduce: bool = False,
) -> list[Any]:  # fmt: skip
    vpp = len(models)
    if not models[0].config.variable_seq_lengths:  # interleaved (VPP) schedule: one fixed shape
        length = max(mb.row_length for mb in micro_batches)
        micro_batches = [pad_row(mb, length) for mb in micro_batches]
    iterators = [iter(micro_batches) for _ in range(vpp)]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if vpp > 1 else iterators[0],
        model=models,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.row_length for mb in micro_batches),
        micro_batch_size=1,
        forward_only=forward_only,
        force_all_reduce=force_all_reduce,
    )


def train_step(
    models: list[Any],
    optimizer: Any,
    micro_batches: list[PackedMicroBatch],
    objective: Objective,
    options: ForwardOptions = ForwardOptions(),
    *,
    on_grads: Callable[[list[Any]], None] | None = None,
    replay: RouteReplayer | None = None,
) -> StepResult:
    """micro-batches -> forward/backward -> finalize grads -> optimizer step (or a skip).

    `on_grads(models)`, when given, runs after the gradients are final and before the step;
    the DP reduction is then an all-reduce (not the distributed optimizer's reduce-scatter) so
    every rank sees whole gradients in ``param.main_grad`` (inspection, tests).
    """
    if not micro_batches:
        raise ValueError("micro_batches must not be empty")
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    dp_group = data_parallel_group()
    counts = global_counts(micro_batches, dp_group)
    cp = ps.get_context_parallel_world_size()

    def loss_closure(mb: PackedMicroBatch, output: Tensor):
        logp, entropy = whole_rows(mb, output)
        loss, metrics = policy_loss_share(objective, counts, mb, logp, entropy,
                                          dp_group=dp_group)
        tokens = torch.tensor(mb.num_tokens, dtype=torch.int, device=loss.device)
        return loss / cp, tokens, {"metrics": metrics, "weight": mb.num_tokens}

    forward_step = make_forward_step(options, loss_closure, replay)
    outputs = _run_schedule(models, micro_batches, forward_step, False, on_grads is not None)
    route_metrics = {} if replay is None else replay.finish_step(
        training=True, recompute=models[0].config.recompute_granularity is not None)
    if on_grads is not None:
        on_grads(models)
    finite = grads_are_finite(models)
    grad_norm = float("nan")
    if finite:
        ok, norm, _ = optimizer.step()
        grad_norm = float(norm) if norm is not None else float("nan")
        finite = bool(ok)
    return StepResult(
        metrics=_reduce_metrics(outputs, counts, grad_norm, not finite) | route_metrics,
        grad_norm=grad_norm,
        num_tokens=counts.num_tokens,
        num_sequences=counts.num_sequences,
        skipped=not finite,
        problem=None if finite else "non-finite gradients",
    )


def grads_are_finite(models: list[Any]) -> bool:
    """True when every rank's gradient buffers are finite (one MAX all-reduce over the world).

    A non-finite reduced gradient needs a non-finite local contribution on some rank, so
    checking the local buffers of every rank is enough and costs one pass and one collective.
    """
    bad = torch.zeros(1)
    for model in models:
        for buffer in [*model.buffers, *model.expert_parallel_buffers]:
            if not torch.isfinite(buffer.grad_data).all():
                bad.fill_(1.0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        bad = bad.to(comm_device())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _reduce_metrics(
    outputs: list[Any], counts: GlobalCounts, grad_norm: float, skipped: bool
) -> dict[str, float]:
    accumulator = MetricAccumulator()
    reporting = (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    if reporting:
        # a row without loss tokens (a padding row of a token budget) says nothing; a rank
        # whose rows all have none still reports, with weight 1, so no mean is 0/0
        empty = not any(out["weight"] for out in outputs)
        for out in outputs:
            if out["weight"] or empty:
                accumulator.add(out["metrics"], weight=max(out["weight"], 1))
    metrics = accumulator.reduce()
    metrics.update(
        {
            "train/grad_norm": grad_norm,
            "train/num_tokens": float(counts.num_tokens),
            "train/num_sequences": float(counts.num_sequences),
            "train/skipped_update": float(skipped),
            "train/undone_update": 0.0,  # megarl.megatron.policy: 1 when the guard undid it
        }
    )
    return metrics


def compute_logprobs(
    models: list[Any],
    micro_batches: list[PackedMicroBatch],
    options: ForwardOptions = ForwardOptions(),
    *,
    with_entropy: bool = False,
    replay: RouteReplayer | RouteRecorder | None = None,
) -> list[Tensor]:
    """Forward-only log-probs (old / reference policy) of every micro-batch's labels.

    Same code path as training; returns label-aligned ``[T]`` rows (``[T, 2]`` with entropy)
    on every rank (broadcast from the last pipeline stage).
    """

    def collect(mb: PackedMicroBatch, output: Tensor):
        logp, entropy = whole_rows(mb, output)
        row = torch.stack([logp, entropy], dim=-1) if with_entropy else logp
        zero = logp.new_zeros(())
        return zero, torch.tensor(0, dtype=torch.int), {"row": row.detach()}

    with torch.no_grad():
        outputs = _run_schedule(models, micro_batches,
                                make_forward_step(options, collect, replay), True)
    if replay is not None:
        replay.finish_step(training=False, recompute=False)
    rows = []
    last = ps.is_pipeline_last_stage()
    device = next(models[0].parameters()).device
    for i, mb in enumerate(micro_batches):
        shape = (mb.row_length, 2) if with_entropy else (mb.row_length,)
        if last:  # rows padded for a fixed-shape (VPP) schedule are cut back to the batch's
            row = outputs[i]["row"][: mb.row_length].contiguous()
        else:
            row = torch.empty(shape, dtype=torch.float32, device=device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(row, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        rows.append(row)
    return rows
