"""The policy loss as a megatron-core loss function, and the normalisation contract.

Contract (one, stated once; proven by tests/distributed/layouts.py and
tests/unit/test_megatron_loss.py):

1. Before the schedule, the GLOBAL normalisers of the mini-batch are counted once:
   ``num_tokens`` = loss tokens and ``num_sequences`` = samples with a loss token, over every
   micro-batch and every data-parallel rank (`global_counts`, one all-reduce over DP; CP
   ranks of one DP rank hold slices of the same samples, so a sample is counted once).
2. Each micro-batch's loss function returns its SHARE of the global loss,
   the run's ``megarl.losses.Objective(..., num_tokens, num_sequences)``: the shares of all
   micro-batches on all DP ranks SUM to the mini-batch loss L.
3. megatron-core must neither scale nor average, so every scaling it would apply is switched
   off explicitly:
   - ``calculate_per_token_loss=True``: the schedule leaves the returned loss unscaled (the
     3-tuple path; with ``False`` it divides by ``num_microbatches`` and the token count);
   - DDP ``average_in_collective=False`` and, because of ``calculate_per_token_loss``, gradient
     scaling factors of 1: gradients are SUMMED over DP x CP and expert-DP;
   - ``finalize_model_grads`` is called with ``num_tokens=None`` (`finalize_grads_unscaled`):
     no ``1 / total_num_tokens`` rescale. The count returned as the 3-tuple's second element
     is therefore only bookkeeping (the schedule sums it; nothing divides by it).
   Summing micro-batches, DP replicas and CP slices of shares gives dL/dθ exactly; a split
   of the batch changes neither the loss nor the gradient.
4. Context parallelism: the per-token log-probs of a CP rank are all-gathered over CP into
   whole samples (`gather_from_context_parallel`), so sequence-level losses (GSPO, UP-GSPO,
   seq-mean) see whole sequences. Every CP rank computes the same L and returns ``L / cp``;
   the gather's backward sums the CP ranks' gradients (a reduce-scatter), so each token's
   gradient is ``cp * (1/cp) * dL/dlogp = dL/dlogp``.
5. TP ranks compute identical losses from identical (all-reduced) log-probs; each back-propagates
   through its own vocabulary shard, which is the correct partial gradient (no double count).

Only one rank per DP replica (last pipeline stage, TP rank 0, CP rank 0) reports metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from torch import Tensor

from megarl.losses.objective import Objective
from megarl.megatron.packing import ROLLOUT_LOGPROBS, PackedMicroBatch, cp_partition_index
from megarl.metrics import comm_device


@dataclass(frozen=True)
class GlobalCounts:
    """Normalisers of one mini-batch, identical on every rank."""

    num_tokens: int
    num_sequences: int


def global_counts(
    micro_batches: list[PackedMicroBatch], dp_group: dist.ProcessGroup | None
) -> GlobalCounts:
    """Loss tokens and sequences over all micro-batches and DP ranks (one all-reduce)."""
    local = torch.tensor(
        [sum(mb.num_tokens for mb in micro_batches), sum(mb.num_sequences for mb in micro_batches)],
        dtype=torch.float64,
    )
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        local = local.to(comm_device(dp_group))
        dist.all_reduce(local, group=dp_group)
    tokens, sequences = (int(v) for v in local.tolist())
    return GlobalCounts(num_tokens=tokens, num_sequences=sequences)


def finalize_grads_unscaled(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's `finalize_model_grads` without its ``1 / num_tokens`` rescale (contract 3)."""
    return finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )


class _GatherFromContextParallel(torch.autograd.Function):
    """Forward: whole rows from each CP rank's positions. Backward: sum over CP, own slice."""

    @staticmethod
    def forward(ctx, local: Tensor, cu_seqlens: Tensor, group) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        # every rank's positions follow from cu_seqlens: no need to communicate them
        indices = [cp_partition_index(cu_seqlens, world, r).to(local.device) for r in range(world)]
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        full = local.new_zeros((int(cu_seqlens[-1]), *local.shape[1:]))
        full[torch.cat(indices)] = torch.cat(pieces)
        ctx.save_for_backward(indices[rank])
        ctx.group = group
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        (index,) = ctx.saved_tensors
        grad_full = grad_full.contiguous().clone()
        dist.all_reduce(grad_full, group=ctx.group)
        return grad_full[index], None, None


def gather_from_context_parallel(
    local: Tensor, cu_seqlens: Tensor, group: dist.ProcessGroup | None
) -> Tensor:
    """``[t_local, ...]`` values of this CP rank's positions (`cp_partition_index`) -> the whole
    ``[T, ...]`` row on every CP rank."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return _GatherFromContextParallel.apply(local, cu_seqlens, group)


def policy_loss_share(
    objective: Objective,
    counts: GlobalCounts,
    mb: PackedMicroBatch,
    log_prob_row: Tensor,
    entropy_row: Tensor | None,
    *,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the global loss from whole-row ``[T]`` log-probs (the
    objective was resolved once per run: no lookup or validation here)."""
    return objective(
        mb.unpack(log_prob_row),
        mb.unpack(mb.old_logprobs),
        mb.unpack(mb.advantages),
        mb.unpack(mb.loss_mask.to(torch.float32)).bool(),
        counts.num_tokens,
        counts.num_sequences,
        ref_log_prob=mb.unpack(mb.ref_logprobs) if mb.ref_logprobs is not None else None,
        entropy=mb.unpack(entropy_row) if entropy_row is not None else None,
        rollout_log_prob=(mb.unpack(mb.extras[ROLLOUT_LOGPROBS])
                          if ROLLOUT_LOGPROBS in mb.extras else None),
        process_group=dp_group,
    )
