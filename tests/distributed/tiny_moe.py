"""The tiny Qwen3-MoE of the distributed tests, and full <-> local parameter sharding.

The reference run (one rank) owns the FULL parameters; every layout copies its shard of them,
so all layouts start from identical weights. Sharding follows megatron-core's own parameter
attributes (``tensor_model_parallel``, ``partition_dim``), its global layer offset and the
expert-parallel rank; gated ``linear_fc1`` shards are ``[gate_shard; up_shard]``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from megatron.core import parallel_state as ps

TINY_QWEN3_MOE: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,  # the dense layer (mlp_only_layers)
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: 2 query groups
    "head_dim": 16,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],  # layer 0 dense, layers 1-3 MoE: covers both layer kinds
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "initializer_range": 0.1,
}

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def local_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> full (single-rank) name, for one model chunk."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = model.config
    inner = model.module if hasattr(model, "module") else model
    offset = get_transformer_layer_offset(config, vp_stage=getattr(inner, "vp_stage", None))
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    per_rank = (config.num_moe_experts or 0) // ep
    names = {}
    for name, _ in model.named_parameters():
        local = name.removeprefix("module.")
        full = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local)
        full = _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + ep_rank * per_rank}.",
                           full)
        names[name] = full
    return names


def shard_of(full: torch.Tensor, name: str, param: torch.nn.Parameter, gated: bool) -> torch.Tensor:
    """This rank's shard of the full tensor `full` for parameter `param` (named `name`)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if ".experts." in name:
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
    else:
        size = ps.get_tensor_model_parallel_world_size()
        rank = ps.get_tensor_model_parallel_rank()
    if size == 1:
        return full
    if gated and name.endswith("linear_fc1.weight"):
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(size, dim=param.partition_dim)[rank]


def load_full_state(models: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the full state into the model chunks."""
    with torch.no_grad():
        for model in models:
            names = local_names(model)
            for name, param in model.named_parameters():
                shard = shard_of(full[names[name]], name, param, model.config.gated_linear_unit)
                param.copy_(shard)


def sharded(
    models: list[torch.nn.Module], full: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{full name: this rank's shard} of a full tensor dict (grads, params after a step)."""
    out = {}
    for model in models:
        names = local_names(model)
        for name, param in model.named_parameters():
            gated = model.config.gated_linear_unit
            out[names[name]] = shard_of(full[names[name]], name, param, gated)
    return out
