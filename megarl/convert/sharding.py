"""Global Megatron tensors <-> one rank's shards, by name, for any TP / PP / VPP / EP / ETP.

Pure torch: the same rules serve checkpoint conversion (no model needed) and the live model.
Rules (megatron-core's own splits):
- tensor parallel along dim 0: vocab (``word_embeddings``, ``output_layer``), ``linear_qkv``
  (whole query groups, thanks to the per-group interleave), ``linear_fc1`` as gate and up halves
  split separately (rank r holds ``[gate_r; up_r]``); along dim 1: ``linear_proj``,
  ``linear_fc2``; everything else (norms, router) is replicated;
- experts use the expert-TP size/rank instead of TP; global expert ``g`` lives on EP rank
  ``g // (E / ep)`` as local expert ``g % (E / ep)``;
- pipeline: layers are split evenly into ``pp * vpp`` chunks; chunk ``c`` is virtual stage
  ``c // pp`` of pipeline rank ``c % pp``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from megarl.convert.mapping import ConversionError, TensorMap
from megarl.layout import RankCoordinates

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.weight)(\d+)$")


def tp_split_dim(name: str) -> int | None:
    """The dim a tensor is split along under (expert) TP; None when replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return 0
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0
    if re.search(r"linear_fc1\.weight\d*$", name):
        return 0
    if re.search(r"(linear_proj|linear_fc2)\.weight\d*$", name):
        return 1
    return None


def is_gated_fc1(name: str) -> bool:
    return re.search(r"linear_fc1\.weight\d*$", name) is not None


def is_expert(name: str) -> bool:
    return ".experts." in name


def layer_home(layer: int, num_layers: int, pp: int, vpp: int) -> tuple[int, int, int]:
    """Global layer -> (pipeline rank, virtual stage, local layer index)."""
    chunks = pp * vpp
    if num_layers % chunks:
        raise ConversionError(f"{num_layers} layers cannot be split into pp*vpp = {chunks} chunks")
    per_chunk = num_layers // chunks
    chunk = layer // per_chunk
    return chunk % pp, chunk // pp, layer % per_chunk


def expert_home(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """Global expert -> (EP rank, local expert index)."""
    if num_experts % ep:
        raise ConversionError(f"{num_experts} experts cannot be split over ep={ep}")
    per_rank = num_experts // ep
    return expert // per_rank, expert % per_rank


def owned(tm: TensorMap, num_layers: int, num_experts: int, at: RankCoordinates) -> bool:
    """Whether the chunk at `at` holds (a shard of) tensor `tm`."""
    if tm.layer is None:
        first = at.pp_rank == 0 and at.vp_stage == 0
        last = at.pp_rank == at.pp - 1 and at.vp_stage == at.vpp - 1
        return first if tm.megatron.startswith("embedding.") else last
    pp_rank, vp_stage, _ = layer_home(tm.layer, num_layers, at.pp, at.vpp)
    if (pp_rank, vp_stage) != (at.pp_rank, at.vp_stage):
        return False
    return tm.expert is None or expert_home(tm.expert, num_experts, at.ep)[0] == at.ep_rank


def local_name(tm: TensorMap, num_layers: int, num_experts: int, at: RankCoordinates) -> str:
    """The parameter name of `tm` inside the chunk at `at` (local layer / expert indices)."""
    name = tm.megatron
    if tm.layer is not None:
        _, _, local_layer = layer_home(tm.layer, num_layers, at.pp, at.vpp)
        name = _LAYER.sub(f"decoder.layers.{local_layer}.", name)
    if tm.expert is not None:
        _, j = expert_home(tm.expert, num_experts, at.ep)
        name = _LOCAL_EXPERT.sub(f".local_experts.{j}.", name)
        name = _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{j}", name)
    return name


def _tp(name: str, at: RankCoordinates) -> tuple[int, int]:
    return (at.etp, at.etp_rank) if is_expert(name) else (at.tp, at.tp_rank)


def shard(name: str, full: Tensor, at: RankCoordinates) -> Tensor:
    """This rank's TP shard of the global tensor `name`."""
    dim = tp_split_dim(name)
    size, rank = _tp(name, at)
    if dim is None or size == 1:
        return full
    if full.shape[dim] % (2 * size if is_gated_fc1(name) else size):
        raise ConversionError(
            f"{name}: dim {dim} of {tuple(full.shape)} does not split {size} ways"
        )
    if is_gated_fc1(name):
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(size, dim=dim)[rank].contiguous()


def unshard(name: str, pieces: list[Tensor]) -> Tensor:
    """The global tensor from the TP shards of all ranks, in rank order (inverse of `shard`)."""
    dim = tp_split_dim(name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if is_gated_fc1(name):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=dim)
