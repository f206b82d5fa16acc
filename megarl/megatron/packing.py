"""Sequence packing (THD): variable-length samples -> micro-batches of one packed row each.

A `TrainSample` is token-aligned: ``tokens[i]`` and, for every per-token field,
``field[i]`` describes ``tokens[i]`` (``old_logprobs[i] = log pi_old(tokens[i] | tokens[:i])``).
Position 0 is never trained (nothing predicts it). A `PackedMicroBatch` is label-aligned, as
megatron computes it: row position ``j`` predicts ``labels[j] = tokens[j + 1]``.

Layout of one packed row of length ``T`` (``cu_seqlens`` are segment boundaries)::

    | sample 0 (+pad to seq_multiple) | sample 1 (+pad) | ... | tail padding |

``seq_multiple`` is ``2 * cp`` under context parallelism (each sample is cut into 2cp chunks,
see `cp_partition_index`); ``row_multiple`` makes ``T`` divisible by ``tp * 2cp`` for sequence
parallelism. Padding has ``loss_mask = 0`` and its own segment, so it never attends to or is
attended by a sample.

Attention: with Transformer-Engine the row is passed as THD (``PackedSeqParams``, RoPE positions
restart per sample). megatron's local attention has no THD path, so there the row carries a
block-diagonal causal mask instead and RoPE positions run across the row; RoPE scores depend
only on position differences, so each sample sees the same attention up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from megarl.batching import PADDING_TOKENS, budget_groups, count_groups, round_up
from megarl.policy_io import TrainSample

ROUTES = "routed_experts"  # PackedMicroBatch.extras key of the packed routes [T, layers, topk]
ROLLOUT_LOGPROBS = "rollout_logprobs"  # extras key: the engine's log-probs [T], label-aligned


@dataclass
class PackedMicroBatch:
    """One packed row; per-token tensors are ``[T]`` and label-aligned."""

    input_ids: Tensor  # [T] int64
    labels: Tensor  # [T] int64: input_ids shifted left within each sample
    loss_mask: Tensor  # [T] bool
    advantages: Tensor  # [T] float32
    old_logprobs: Tensor  # [T] float32 (zeros when not provided)
    ref_logprobs: Tensor | None  # [T] float32
    cu_seqlens: Tensor  # [segments + 1] int32, padded sample lengths, tail padding last
    sample_starts: list[int]  # row offset of each sample
    sample_lengths: list[int]  # real (unpadded) length of each sample
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Loss tokens in this micro-batch."""
        return int(self.loss_mask.sum().item())

    @property
    def num_sequences(self) -> int:
        """Samples with at least one loss token (the seq-mean denominator)."""
        return int((self.unpack(self.loss_mask.float()).sum(-1) > 0).sum().item())

    @property
    def row_length(self) -> int:
        return int(self.input_ids.shape[0])

    def unpack_index(self) -> tuple[Tensor, Tensor]:
        """``(index [n, Lmax], valid [n, Lmax])``: row positions of each sample, left-aligned."""
        n, lmax = len(self.sample_lengths), max(self.sample_lengths)
        offsets = torch.arange(lmax)
        starts = torch.tensor(self.sample_starts).unsqueeze(1)
        lengths = torch.tensor(self.sample_lengths).unsqueeze(1)
        valid = offsets.unsqueeze(0) < lengths
        index = torch.where(valid, starts + offsets, torch.zeros_like(starts))
        return index.to(self.input_ids.device).view(n, lmax), valid.to(self.input_ids.device)

    def unpack(self, values: Tensor) -> Tensor:
        """``[T] -> [n, Lmax]`` (zeros past each sample's end); differentiable. The result is
        on the device of `values` (a CPU micro-batch unpacks a GPU row)."""
        index, valid = self.unpack_index()
        index, valid = index.to(values.device), valid.to(values.device)
        out = values[index]
        return torch.where(valid, out, torch.zeros_like(out))

    def to(self, device: torch.device | str) -> PackedMicroBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device)
            elif f.name == "extras":
                value = {k: v.to(device) for k, v in value.items()}
            moved[f.name] = value
        return PackedMicroBatch(**moved)


def _label_aligned(values: Tensor, fill: float | bool) -> Tensor:
    """Shift a token-aligned tensor to label alignment: out[j] = values[j + 1]."""
    return torch.cat([values[1:], values.new_full((1,), fill)])


def pack_samples(
    samples: list[TrainSample], *, seq_multiple: int = 1, row_multiple: int = 1
) -> PackedMicroBatch:
    """Pack `samples` into one row (see the module docstring for the layout)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ids, labels, masks, advs, olds, refs = [], [], [], [], [], []
    starts, lengths, bounds = [], [], [0]
    has_ref = samples[0].ref_logprobs is not None
    has_routes = samples[0].routed_experts is not None
    has_rollout = samples[0].rollout_logprobs is not None
    routes, rollout = [], []
    for i, s in enumerate(samples):
        s.check(i)
        if (s.ref_logprobs is not None) != has_ref:
            raise ValueError(f"samples[{i}].ref_logprobs: give it for every sample or none")
        n = s.tokens.shape[0]
        padded = round_up(n, seq_multiple)
        pad = padded - n
        adv = torch.as_tensor(s.advantages, dtype=torch.float32).expand(n)
        old = s.old_logprobs if s.old_logprobs is not None else torch.zeros(n)
        starts.append(bounds[-1])
        lengths.append(n)
        bounds.append(bounds[-1] + padded)
        ids.append(torch.nn.functional.pad(s.tokens.long(), (0, pad)))
        labels.append(torch.nn.functional.pad(_label_aligned(s.tokens.long(), 0), (0, pad)))
        masks.append(torch.nn.functional.pad(_label_aligned(s.loss_mask.bool(), False), (0, pad)))
        advs.append(torch.nn.functional.pad(_label_aligned(adv.float(), 0.0), (0, pad)))
        olds.append(torch.nn.functional.pad(_label_aligned(old.float(), 0.0), (0, pad)))
        if has_ref:
            refs.append(torch.nn.functional.pad(_label_aligned(s.ref_logprobs.float(), 0.0),
                                                (0, pad)))
        if (s.rollout_logprobs is not None) != has_rollout:
            raise ValueError(f"samples[{i}].rollout_logprobs: give it for every sample or none")
        if has_rollout:
            rollout.append(torch.nn.functional.pad(
                _label_aligned(s.rollout_logprobs.float(), 0.0), (0, pad)))
        if (s.routed_experts is not None) != has_routes:
            raise ValueError(f"samples[{i}].routed_experts: give it for every sample or none")
        if has_routes:  # token-aligned like input_ids; padding rows route to 0..k-1
            if s.routed_experts.shape[0] != n:
                raise ValueError(f"samples[{i}].routed_experts has {s.routed_experts.shape[0]} "
                                 f"rows for {n} tokens (see router_replay.align_routes)")
            routes.append(torch.cat([s.routed_experts, _route_padding(s.routed_experts, pad)]))
    packed = PackedMicroBatch(
        input_ids=torch.cat(ids),
        labels=torch.cat(labels),
        loss_mask=torch.cat(masks),
        advantages=torch.cat(advs),
        old_logprobs=torch.cat(olds),
        ref_logprobs=torch.cat(refs) if has_ref else None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        sample_starts=starts,
        sample_lengths=lengths,
        extras=({ROUTES: torch.cat(routes)} if has_routes else {})
        | ({ROLLOUT_LOGPROBS: torch.cat(rollout)} if has_rollout else {}),
    )
    return pad_row(packed, round_up(bounds[-1], row_multiple))


def _route_padding(like: Tensor, rows: int) -> Tensor:
    """Padding rows of routes: the distinct ids 0..k-1 in every MoE layer."""
    _, layers, k = like.shape
    return torch.arange(k, dtype=like.dtype).expand(rows, layers, k)


def make_micro_batches(
    samples: list[TrainSample],
    *,
    max_tokens: int | None = None,
    num_micro_batches: int | None = None,
    seq_multiple: int = 1,
    row_multiple: int = 1,
) -> list[PackedMicroBatch]:
    """Split `samples` into packed micro-batches.

    Exactly one of `max_tokens` (token budget per row: first-fit decreasing; a sample longer
    than the budget gets a row of its own) or `num_micro_batches` (contiguous groups of near
    equal sample counts) must be given. `megarl.batching` has the cut over DP ranks as well.
    """
    if (max_tokens is None) == (num_micro_batches is None):
        raise ValueError("give exactly one of max_tokens or num_micro_batches")
    if not samples:
        raise ValueError("samples must not be empty")
    indices = list(range(len(samples)))
    if num_micro_batches is not None:
        groups = count_groups(indices, num_micro_batches)
    else:
        lengths = [round_up(int(s.tokens.shape[0]), seq_multiple) for s in samples]
        groups = budget_groups(lengths, indices, max_tokens)
    return pack_groups(samples, groups, seq_multiple=seq_multiple, row_multiple=row_multiple)


def pack_groups(samples: list[TrainSample], groups: list[list[int]], *, seq_multiple: int = 1,
                row_multiple: int = 1) -> list[PackedMicroBatch]:  # fmt: skip
    """One packed micro-batch per group of indices into `samples`; an empty group is a padding
    micro-batch (`padding_sample`: every per-token field the samples carry, nothing trained)."""
    return [pack_samples([samples[i] for i in g] if g else [padding_sample(samples[0])],
                         seq_multiple=seq_multiple, row_multiple=row_multiple)
            for g in groups]


def padding_sample(like: TrainSample) -> TrainSample:
    """A sequence that trains nothing (no loss token, zero advantage), with the same optional
    fields as `like`, so it packs and flows through every pass like a real one."""
    n = PADDING_TOKENS

    def zeros(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.zeros(n, dtype=t.dtype)

    routes = None
    if like.routed_experts is not None:
        routes = _route_padding(like.routed_experts, n)
    return TrainSample(tokens=torch.zeros(n, dtype=like.tokens.dtype),
                       loss_mask=torch.zeros(n, dtype=torch.bool), advantages=torch.tensor(0.0),
                       old_logprobs=zeros(like.old_logprobs), ref_logprobs=zeros(like.ref_logprobs),
                       routed_experts=routes, rollout_logprobs=zeros(like.rollout_logprobs))


def pad_row(mb: PackedMicroBatch, length: int) -> PackedMicroBatch:
    """`mb` with its row extended to `length` by a padding segment (never trained)."""
    tail = length - mb.row_length
    if tail < 0:
        raise ValueError(f"cannot pad a row of {mb.row_length} tokens to {length}")
    if tail == 0:
        return mb

    def ext(t: Tensor | None, fill: float | bool = 0) -> Tensor | None:
        return None if t is None else torch.cat([t, t.new_full((tail,), fill)])

    cu = torch.cat([mb.cu_seqlens, mb.cu_seqlens.new_tensor([length])])
    extras = dict(mb.extras)
    if ROUTES in extras:
        extras[ROUTES] = torch.cat([extras[ROUTES], _route_padding(extras[ROUTES], tail)])
    if ROLLOUT_LOGPROBS in extras:
        extras[ROLLOUT_LOGPROBS] = ext(extras[ROLLOUT_LOGPROBS])
    return PackedMicroBatch(
        input_ids=ext(mb.input_ids), labels=ext(mb.labels), loss_mask=ext(mb.loss_mask, False),
        advantages=ext(mb.advantages), old_logprobs=ext(mb.old_logprobs),
        ref_logprobs=ext(mb.ref_logprobs), cu_seqlens=cu, sample_starts=mb.sample_starts,
        sample_lengths=mb.sample_lengths, extras=extras,
    )  # fmt: skip


def segment_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """``[T]`` segment index of each row position."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.long), positions, right=True)


def block_causal_mask(cu_seqlens: Tensor, length: int) -> Tensor:
    """``[1, 1, T, T]`` bool, True = masked: causal within a segment, nothing across."""
    seg = segment_ids(cu_seqlens, length)
    pos = torch.arange(length, device=cu_seqlens.device)
    masked = (seg.unsqueeze(1) != seg.unsqueeze(0)) | (pos.unsqueeze(0) > pos.unsqueeze(1))
    return masked.view(1, 1, length, length)


def cp_partition_index(cu_seqlens: Tensor, cp: int, cp_rank: int) -> Tensor:
    """Row positions held by context-parallel rank `cp_rank` (load-balanced "zigzag").

    Every segment (length divisible by ``2 * cp``) is cut into ``2 * cp`` chunks; rank ``r``
    holds chunks ``r`` and ``2cp - 1 - r`` so causal attention work is balanced. This is the
    layout Transformer-Engine's THD context parallelism expects.
    """
    if cp == 1:
        return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device)
    parts = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        length = end - start
        if length % (2 * cp):
            raise ValueError(f"segment length {length} is not divisible by 2*cp={2 * cp}")
        chunk = length // (2 * cp)
        for c in (cp_rank, 2 * cp - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts).to(cu_seqlens.device)
