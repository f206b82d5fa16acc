"""The tiny Qwen3-MoE of the distributed tests, and full <-> local parameters.

The reference run (one rank) owns the FULL parameters (global Megatron names); every layout
copies its shards of them, so all layouts start from identical weights. Names and shards come
from megarl's own map (`megarl.convert`), the one the converters use.
"""

from __future__ import annotations

from typing import Any

import torch

from megarl.convert.mapping import Architecture, tensor_maps
from megarl.convert.sharding import local_name, owned, shard
from megarl.megatron.experts import named_expert_tensors
from megarl.megatron.weights import coordinates, scheme_of

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

ARCH = Architecture.from_hf(TINY_QWEN3_MOE)


def named_tensors(model: torch.nn.Module, of=None) -> list[tuple[str, torch.Tensor]]:
    """The chunk's parameters (or ``of(param)``, e.g. its ``main_grad``) by name, grouped
    experts' stacked weights as per-expert views (SequentialMLP's names, as the map has)."""
    return list(named_expert_tensors(model, of))


def local_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name in this chunk (per-expert names, see `named_tensors`) -> global
    (single-rank) name."""
    at = coordinates(model)
    by_local = {
        local_name(tm, ARCH.num_layers, ARCH.num_experts, at): tm.megatron
        for tm in tensor_maps(ARCH, scheme_of(model))
        if owned(tm, ARCH.num_layers, ARCH.num_experts, at)
    }
    return {name: by_local[name.removeprefix("module.")] for name, _ in named_tensors(model)}


def sharded(
    models: list[torch.nn.Module], full: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{global name: this rank's shard} of a full tensor dict (params, grads, a step's result)."""
    out = {}
    for model in models:
        at = coordinates(model)
        for global_name in local_names(model).values():
            out[global_name] = shard(global_name, full[global_name], at)
    return out


def load_full_state(models: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the full state into the model chunks."""
    shards = sharded(models, full)
    with torch.no_grad():
        for model in models:
            names = local_names(model)
            for name, param in named_tensors(model):
                param.copy_(shards[names[name]])
