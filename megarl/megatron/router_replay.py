"""Routing replay into megatron-core's native `RouterReplay` (``moe_enable_routing_replay``).

R3 replays the rollout engine's expert choices in training, so the ratio pi/pi_old compares the
same experts. Routes travel with the tokens: `TrainSample.routed_experts` is token-aligned
``[L, moe_layers, topk]`` and `pack_samples` packs them exactly like ``input_ids`` (padding rows
get the distinct ids ``0..topk-1``: duplicate ids would break the all-to-all token counts).
Per micro-batch and model chunk, `RouteReplayer.before_forward` takes the rows this rank's
routers see (the context-parallel partition of the tokens, then the sequence-parallel slice of
this TP rank) and gives each local router its MoE layer's column, keyed by GLOBAL layer number
(a pipeline stage installs only its own layers). megatron gathers the router's own scores at the
replayed ids, so router weights still get gradients.

After the model's forward the routers switch to REPLAY_BACKWARD: activation recomputation
re-runs the router inside backward and pops the same routes, first in first out. `finish_step`
checks that every installed route was consumed and clears everything.

Each replaying router also computes its own top-k and counts the (token, layer) routes whose
expert SET differs from the replayed one, over the rows the engine routed (not padding, not a
sample's last token): ``router/replay_disagreement``.

R2 (`RouteRecorder`) routes with Megatron's own router in the old-log-prob pass, records the
choices (megatron's RECORD action) and `take` reassembles them into whole packed rows on every
rank of the TP x CP x PP group; `sample_routes` cuts them back into token-aligned
``TrainSample.routed_experts``, which the training passes replay as in R3. It keeps the ratio
pi/pi_old on one routing when the engine cannot return routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from torch import Tensor

from megarl.errors import UserError
from megarl.megatron.loss import gather_from_context_parallel
from megarl.megatron.packing import ROUTES, PackedMicroBatch, cp_partition_index
from megarl.metrics import comm_device
from megarl.routes import check_routes, route_dtype


def rows_for_this_rank(mb: PackedMicroBatch, routes: Tensor, sequence_parallel: bool) -> Tensor:
    """The route rows this rank's routers see: CP partition, then this TP rank's SP slice."""
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        routes = routes[cp_partition_index(mb.cu_seqlens, cp, ps.get_context_parallel_rank())]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and sequence_parallel:
        if routes.shape[0] % tp:
            raise UserError(f"routed rows {routes.shape[0]} not divisible by tp={tp} "
                            "(pack with row_multiple = tp * 2cp)")
        routes = routes.chunk(tp)[ps.get_tensor_model_parallel_rank()]
    return routes


@dataclass
class _Local:
    chunk: int
    layer: int  # global, 1-based (megatron's layer_number)
    moe_index: int  # column in the routes' MoE-layer axis
    replay: RouterReplay


class _LocalRouters:
    """This rank's routers (of every model chunk), keyed by global layer number."""

    def __init__(self, models: list[Any], moe_layers: tuple[bool, ...], num_experts: int,
                 topk: int) -> None:  # fmt: skip
        moe_index = {g + 1: i for i, g in enumerate(j for j, m in enumerate(moe_layers) if m)}
        self.num_experts, self.topk, self.num_moe_layers = num_experts, topk, len(moe_index)
        self.locals: list[_Local] = []
        self._chunk_of: dict[int, int] = {}
        for c, model in enumerate(models):
            inner = model.module if hasattr(model, "module") else model
            self._chunk_of[id(inner)] = c
            self._chunk_of[id(model)] = c
            self.sequence_parallel = bool(inner.config.sequence_parallel)
            for module in inner.modules():
                if isinstance(module, TopKRouter):
                    if module.router_replay is None:
                        raise UserError("routing replay needs moe_enable_routing_replay=True "
                                        "in the TransformerConfig (transformer_config_from_hf"
                                        "(..., routing_replay=True))")
                    layer = int(module.layer_number)
                    self.locals.append(_Local(c, layer, moe_index[layer], module.router_replay))
        self.num_chunks = len(models)

    def _chunk(self, model: Any) -> int:
        """The chunk index of `model` (as built, or wrapped in DDP after)."""
        for candidate in (model, getattr(model, "module", None)):
            if id(candidate) in self._chunk_of:
                return self._chunk_of[id(candidate)]
        raise RuntimeError("routing replay: a model chunk this replayer was not built for")

    def _clear(self) -> None:
        for local in self.locals:
            local.replay.clear_indices()
            local.replay.clear_router_replay_action()


class RouteReplayer(_LocalRouters):
    """Installs packed routes into the routers of this rank's model chunks (R3, and R2's
    training side)."""

    def __init__(self, models: list[Any], moe_layers: tuple[bool, ...], num_experts: int,
                 topk: int) -> None:  # fmt: skip
        super().__init__(models, moe_layers, num_experts, topk)
        self.counts_routes = self.sequence_parallel or ps.get_tensor_model_parallel_rank() == 0
        for local in self.locals:
            _wrap(local.replay, self)
        # (disagreeing routes, routes seen), summed on the routers' device: read once a step,
        # not once per MoE layer and micro-batch (a host sync each on a GPU)
        self.counts: torch.Tensor | None = None
        self.last_metrics: dict[str, float] = {}

    def add_counts(self, disagree: torch.Tensor, seen: torch.Tensor) -> None:
        pair = torch.stack([disagree, seen]).to(torch.int64)
        self.counts = pair if self.counts is None else self.counts + pair

    def before_forward(self, mb: PackedMicroBatch, model: Any) -> None:
        routes = mb.extras.get(ROUTES)
        if routes is None:
            raise UserError("routing replay is on but the micro-batch has no routed_experts")
        check_routes(routes, self.num_experts, "micro-batch routed_experts")
        if routes.shape[1] != self.num_moe_layers:
            raise UserError(f"routed_experts has {routes.shape[1]} MoE layers, the model "
                            f"{self.num_moe_layers}")
        rows = rows_for_this_rank(mb, routes, self.sequence_parallel)
        routed = rows_for_this_rank(mb, _routed_rows(mb), self.sequence_parallel)
        chunk = self._chunk(model)
        for local in self.locals:
            if local.chunk == chunk:
                local.replay.set_target_indices(rows[:, local.moe_index].long())
                local.replay.megarl_routed_rows = routed
                local.replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, model: Any) -> None:
        chunk = self._chunk(model)
        for local in self.locals:
            if local.chunk == chunk:  # a recompute in backward pops what the forward used
                local.replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    def finish_step(self, *, training: bool, recompute: bool) -> dict[str, float]:
        """Check every route was used, clear all routers; returns the step's route metrics."""
        for local in self.locals:
            left = len(local.replay.replay_backward_list)
            if training and recompute and left:
                raise RuntimeError(f"layer {local.layer}: {left} replayed routes were never "
                                   "consumed by the backward recompute")
        self._clear()
        counts = torch.zeros(2, dtype=torch.int64) if self.counts is None else self.counts
        self.counts = None
        if dist.is_initialized():
            counts = counts.to(comm_device())
            dist.all_reduce(counts)
        disagree, seen = (float(c) for c in counts.tolist())
        self.last_metrics = {
            "router/replay_disagreement": disagree / seen if seen else 0.0,
            "router/replayed_routes": seen,
        }
        return self.last_metrics


class RouteRecorder(_LocalRouters):
    """R2: records Megatron's own routes in a forward pass (the old-log-prob pass), so that
    training can replay them with `RouteReplayer` (``sample_routes`` -> ``TrainSample``).

    Each router records the rows it saw; `take` reassembles whole packed rows: the SP slices of
    the TP ranks concatenated, the CP partitions put back in place, the MoE layers of every
    pipeline stage (and virtual stage) summed into one ``[T, moe_layers, k]`` tensor, so every
    rank of a TP x CP x PP group ends with the same routes.
    """

    def __init__(self, models: list[Any], moe_layers: tuple[bool, ...], num_experts: int,
                 topk: int) -> None:  # fmt: skip
        super().__init__(models, moe_layers, num_experts, topk)
        self._records: list[list[Tensor | None]] = [[] for _ in range(self.num_chunks)]
        self._row_lengths: list[int] = []  # as scheduled (a VPP schedule pads the rows)

    def before_forward(self, mb: PackedMicroBatch, model: Any) -> None:
        chunk = self._chunk(model)
        if chunk == 0:
            self._row_lengths.append(mb.row_length)
        for local in self.locals:
            if local.chunk == chunk:
                local.replay.clear_indices()
                local.replay.set_router_replay_action(RouterReplayAction.RECORD)

    def after_forward(self, model: Any) -> None:
        chunk = self._chunk(model)
        rows = None
        for local in self.locals:
            if local.chunk != chunk:
                continue
            got = local.replay.get_recorded_indices()
            if got is None:
                raise RuntimeError(f"layer {local.layer}: the router recorded nothing")
            if rows is None:
                rows = got.new_zeros((got.shape[0], self.num_moe_layers, self.topk))
            rows[:, local.moe_index] = got
            local.replay.clear_indices()
            local.replay.clear_router_replay_action()
        self._records[chunk].append(rows)  # None: a chunk without MoE layers

    def finish_step(self, *, training: bool, recompute: bool) -> dict[str, float]:
        self._clear()
        return {}

    def take(self, micro_batches: list[PackedMicroBatch]) -> list[Tensor]:
        """Whole-row routes ``[T, moe_layers, k]`` of each micro-batch (collective over TP, CP
        and PP); clears the records."""
        records, self._records = self._records, [[] for _ in range(self.num_chunks)]
        lengths, self._row_lengths = self._row_lengths, []
        if len(lengths) != len(micro_batches):
            raise RuntimeError(f"recorded {len(lengths)} micro-batches, asked for "
                               f"{len(micro_batches)}")
        tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
        device = comm_device()
        out = []
        for k, (mb, length) in enumerate(zip(micro_batches, lengths, strict=True)):
            full = torch.zeros((length, self.num_moe_layers, self.topk), dtype=torch.long,
                               device=device)
            for chunk in range(self.num_chunks):
                rows = records[chunk][k]
                if rows is None:
                    continue
                rows = rows.to(device)
                if tp > 1 and self.sequence_parallel:
                    pieces = [torch.empty_like(rows) for _ in range(tp)]
                    dist.all_gather(pieces, rows.contiguous(),
                                    group=ps.get_tensor_model_parallel_group())
                    rows = torch.cat(pieces)
                if cp > 1:
                    rows = gather_from_context_parallel(rows, _padded_cu(mb, length).to(device),
                                                        ps.get_context_parallel_group())
                full += rows  # each chunk fills only its own MoE layers' columns
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.all_reduce(full, group=ps.get_pipeline_model_parallel_group())
            out.append(full[: mb.row_length].to("cpu", route_dtype(self.num_experts)))
        return out


def _padded_cu(mb: PackedMicroBatch, length: int) -> Tensor:
    """`mb.cu_seqlens`, with a row padded to `length` by a fixed-shape schedule."""
    cu = mb.cu_seqlens
    if int(cu[-1]) == length:
        return cu
    return torch.cat([cu, cu.new_tensor([length])])


def sample_routes(mb: PackedMicroBatch, rows: Tensor) -> list[Tensor]:
    """Whole-row routes -> each sample's token-aligned ``[L, moe_layers, k]`` (a
    `TrainSample.routed_experts`)."""
    return [rows[start: start + length].clone()
            for start, length in zip(mb.sample_starts, mb.sample_lengths, strict=True)]


def _routed_rows(mb: PackedMicroBatch) -> Tensor:
    """``[T]`` bool: rows holding a route the engine chose (not padding, not a last token)."""
    routed = torch.zeros(mb.row_length, dtype=torch.bool)
    for start, length in zip(mb.sample_starts, mb.sample_lengths, strict=True):
        routed[start: start + length - 1] = True
    return routed


def _wrap(replay: RouterReplay, owner: RouteReplayer) -> None:
    """Check each replayed batch against the router's input and count disagreements."""
    original: Callable = replay.get_replay_topk

    def get_replay_topk(scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):  # fmt: skip
        action = replay.router_replay_action
        if action not in (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD):
            return original(scores, topk, num_groups, group_topk, default_compute_topk)
        target = replay.target_topk_idx if action == RouterReplayAction.REPLAY_FORWARD else \
            (replay.replay_backward_list[0] if replay.replay_backward_list else None)
        if target is None or target.shape[0] != scores.shape[0]:
            got = None if target is None else target.shape[0]
            raise RuntimeError(f"layer {replay.layer_number}: {got} routes for "
                               f"{scores.shape[0]} tokens")
        probs, indices = original(scores, topk, num_groups, group_topk, default_compute_topk)
        if action == RouterReplayAction.REPLAY_FORWARD:
            with torch.no_grad():
                _, own = default_compute_topk(scores, topk, num_groups=num_groups,
                                              group_topk=group_topk)
                differs = (own.sort(-1).values != indices.sort(-1).values).any(-1)
                routed = replay.megarl_routed_rows.to(differs.device)
                if not owner.counts_routes:  # TP without SP: every TP rank sees the same rows
                    routed = torch.zeros_like(routed)
                owner.add_counts(differs[routed].sum(), routed.sum())
        return probs, indices

    replay.get_replay_topk = get_replay_topk
