"""Routed-expert ids as they travel between the rollout engine and the trainer (R3 replay).

A rollout's ``routed_experts`` is a ``[tokens, moe_layers, topk]`` tensor of expert ids, kept
in the smallest integer dtype that holds them; engines produce it and megatron's replay
consumes it, so it lives here, outside both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.errors import UserError


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype for expert ids (uint8 up to 256 experts)."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


def align_routes(routes: Tensor, num_tokens: int, topk: int) -> Tensor:
    """An engine's ``[num_tokens - 1, layers, k]`` routes as token-aligned ``[num_tokens, ...]``.

    Engines never feed the last sampled token forward, so it has no route; its row gets the
    distinct ids ``0..k-1`` (its output predicts nothing that is trained).
    """
    if routes.dim() != 3 or routes.shape[-1] != topk:
        raise UserError(f"routed_experts: shape {tuple(routes.shape)}, expected "
                        f"[tokens, moe_layers, {topk}]")
    missing = num_tokens - routes.shape[0]
    if missing not in (0, 1):
        raise UserError(f"routed_experts: {routes.shape[0]} rows for {num_tokens} tokens "
                        f"(expected {num_tokens - 1} from the engine, or {num_tokens})")
    if missing == 0:
        return routes
    pad = torch.arange(topk, dtype=routes.dtype).expand(1, routes.shape[1], topk)
    return torch.cat([routes, pad])


def check_routes(routes: Tensor, num_experts: int, where: str) -> None:
    """Ids in range and distinct within each (token, layer)."""
    ids = routes.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise UserError(f"{where}: expert ids must be in [0, {num_experts}), got "
                        f"[{int(ids.min())}, {int(ids.max())}]")
    ordered = ids.sort(-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        bad = (ordered[..., 1:] == ordered[..., :-1]).any(-1).nonzero()[0].tolist()
        raise UserError(f"{where}: duplicate expert ids in one route at (token, layer) {bad}")
