"""HF weights into a live Megatron model, and Megatron weights out as HF tensors (streamed).

Both directions use the one map of `megarl.convert` and fail, naming the tensor, on anything
unmapped, missing, duplicated or of the wrong shape. Loading reads one HF tensor group at a time
(memory-mapped safetensors); exporting gathers one Megatron tensor at a time (TP / expert-TP
all-gather on the ranks that hold it, then one broadcast from its owner), so neither ever holds
more than one tensor beyond the model itself. Export is collective: every rank iterates it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor

from megarl.convert.hf_io import HFCheckpoint, HFCheckpointWriter
from megarl.convert.mapping import (
    Architecture,
    ConversionError,
    Scheme,
    TensorMap,
    check_hf_names,
    tensor_maps,
    tied_output_map,
)
from megarl.convert.sharding import (
    expert_home,
    is_expert,
    layer_home,
    local_name,
    owned,
    shard,
    tp_split_dim,
    unshard,
)
from megarl.layout import RankCoordinates
from megarl.megatron.experts import named_expert_tensors


def coordinates(chunk: Any) -> RankCoordinates:
    """Where `chunk` (a GPTModel, possibly DDP-wrapped) sits in the current layout."""
    inner = chunk.module if hasattr(chunk, "module") else chunk
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    return RankCoordinates(
        tp=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        vpp=vpp,
        vp_stage=(getattr(inner, "vp_stage", None) or 0) if vpp > 1 else 0,
    )


def _params(chunk: Any) -> dict[str, Tensor]:
    """The chunk's parameters by name; grouped experts' stacked weights as per-expert views
    under SequentialMLP's names (megarl/megatron/experts.py), which the map uses."""
    return {name.removeprefix("module."): p for name, p in named_expert_tensors(chunk)}


def scheme_of(chunk: Any) -> Scheme:
    """``te`` when the chunk was built with Transformer-Engine modules, else ``local``."""
    te_name = re.compile(r"(layer_norm_weight|experts\.linear_fc[12]\.weight\d+)$")
    return "te" if any(te_name.search(n) for n in _params(chunk)) else "local"


def load_hf_weights(models: list[Any], checkpoint: HFCheckpoint) -> None:
    """Copy this rank's shards of an HF checkpoint into the model chunks."""
    arch = Architecture.from_hf(checkpoint.config)
    check_hf_names(checkpoint.names(), arch)
    with torch.no_grad():
        for chunk in models:
            at, params = coordinates(chunk), _params(chunk)
            for tm in tensor_maps(arch, scheme_of(chunk)):
                if not owned(tm, arch.num_layers, arch.num_experts, at):
                    continue
                name = local_name(tm, arch.num_layers, arch.num_experts, at)
                param = params.pop(name, None)
                if param is None:
                    raise ConversionError(f"the model has no parameter {name} for {tm.megatron}")
                full = tm.to_megatron([checkpoint.tensor(n) for n in tm.hf], arch)
                piece = shard(tm.megatron, full, at)
                if piece.shape != param.shape:
                    raise ConversionError(
                        f"{tm.megatron}: shard {tuple(piece.shape)} does not fit parameter "
                        f"{name} {tuple(param.shape)}"
                    )
                param.copy_(piece)
            if arch.tie_embeddings and "output_layer.weight" in params:
                tied = tied_output_map(arch)
                full = tied.to_megatron([checkpoint.tensor(tied.hf[0])], arch)
                params.pop("output_layer.weight").copy_(shard(tied.megatron, full, at))
            if params:
                raise ConversionError(f"no HF tensor maps to model parameters {sorted(params)}")


def export_hf_weights(
    models: list[Any], hf_config: dict[str, Any]
) -> Iterator[tuple[str, Tensor]]:
    """``(hf_name, tensor)`` of the whole model in order, on every rank (collective)."""
    arch = Architecture.from_hf(hf_config)
    world = dist.get_world_size()
    places = [(coordinates(c), _params(c)) for c in models]
    scheme = scheme_of(models[0])
    homes: list[Any] = [None] * world  # (pp_rank, ep_rank, vp stages held) of every rank
    mine = (places[0][0].pp_rank, places[0][0].ep_rank)
    dist.all_gather_object(homes, mine)
    dtype = next(iter(places[0][1].values())).dtype
    device = next(iter(places[0][1].values())).device
    rank = dist.get_rank()
    for tm in tensor_maps(arch, scheme):
        full, is_param = _gather_one(tm, arch, places)
        src = _owner_rank(tm, arch, homes, places[0][0])
        if full is None or (is_param and world > 1 and rank != src):
            # receive into a buffer: never broadcast into a live parameter (DP replicas)
            full = torch.empty(tm.shape, dtype=dtype, device=device)
        full = full.to(dtype)  # one dtype for the broadcast (local-spec norms stay fp32)
        if world > 1:
            dist.broadcast(full, src=src)
        yield from zip(tm.hf, tm.to_hf(full, arch), strict=True)


def _gather_one(tm: TensorMap, arch: Architecture, places) -> tuple[Tensor | None, bool]:
    """The whole tensor on the ranks holding a shard of it (TP / expert-TP all-gather), and
    whether it is the live parameter itself. An unsharded parameter is yielded as a view, not
    cloned: the engine copies it in, so a clone would move every byte twice (for MoE models
    nearly all the bytes are unsharded experts under ETP=1). Consumers must not write to it."""
    for at, params in places:
        if not owned(tm, arch.num_layers, arch.num_experts, at):
            continue
        local = params[local_name(tm, arch.num_layers, arch.num_experts, at)].detach()
        group = ps.get_expert_tensor_parallel_group() if is_expert(tm.megatron) else \
            ps.get_tensor_model_parallel_group()
        size = dist.get_world_size(group)
        if tp_split_dim(tm.megatron) is None or size == 1:
            return local, True
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return unshard(tm.megatron, pieces), False
    return None, False


def _owner_rank(tm: TensorMap, arch: Architecture, homes: list[Any], at: RankCoordinates) -> int:
    """The lowest global rank on the pipeline stage (and EP rank) that holds `tm`."""
    if tm.layer is None:
        stage = 0 if tm.megatron.startswith("embedding.") else at.pp - 1
    else:
        stage = layer_home(tm.layer, arch.num_layers, at.pp, at.vpp)[0]
    ep_rank = None if tm.expert is None else expert_home(tm.expert, arch.num_experts, at.ep)[0]
    for rank, (pp_rank, rank_ep) in enumerate(homes):
        if pp_rank == stage and (ep_rank is None or rank_ep == ep_rank):
            return rank
    raise ConversionError(f"no rank holds {tm.megatron}")


def save_hf_checkpoint(
    models: list[Any],
    out_dir: str,
    hf_config: dict[str, Any],
    *,
    tokenizer_from: str | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
) -> None:
    """Write the model as an HF checkpoint from rank 0 (collective: every rank calls it)."""
    writer, error = None, ""
    if dist.get_rank() == 0:
        try:
            writer = HFCheckpointWriter(out_dir, hf_config, tokenizer_from=tokenizer_from,
                                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        except ConversionError as e:
            error = str(e)
    errors = [error]
    dist.broadcast_object_list(errors, src=0)  # every rank fails together, none hangs
    if errors[0]:
        raise ConversionError(errors[0])
    pairs = export_hf_weights(models, hf_config)
    if writer is None:
        for _ in pairs:
            pass
        return
    with writer:
        writer.add_all(pairs)
