"""Routed-expert ids as they travel between the rollout engine and the trainer (R3 replay).

A rollout's ``routed_experts`` is a ``[tokens, moe_layers, topk]`` tensor of expert ids, kept
in the smallest integer dtype that holds them; engines produce it and megatron's replay
consumes it, so it lives here, outside both.
"""

from __future__ import annotations

import torch


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype for expert ids (uint8 up to 256 experts)."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32
