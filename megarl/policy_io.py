"""Plain data between the RL loop and the policy: what the trainer hands over (`TrainSample`) and
what an optimizer step reports back (`StepResult`). No Megatron here, so the loop, the
rollout code and tests use these types without importing the training backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrainSample:
    """One sequence (prompt + response) with token-aligned per-token fields."""

    tokens: Tensor  # [L] int64
    loss_mask: Tensor  # [L] bool: tokens that are trained (response tokens)
    advantages: Tensor  # [L] float, or a 0-d tensor / float broadcast over the sample
    old_logprobs: Tensor | None = None  # [L] float
    ref_logprobs: Tensor | None = None  # [L] float
    routed_experts: Tensor | None = None  # [L, moe_layers, topk] int: rollout routes (R3)
    rollout_logprobs: Tensor | None = None  # [L] float: the engine's (rollout correction)

    def check(self, index: int) -> None:
        n = self.tokens.shape[0] if self.tokens.dim() == 1 else -1
        if n < 2:
            raise ValueError(f"samples[{index}].tokens must be 1-d with >= 2 tokens")
        for name in ("loss_mask", "old_logprobs", "ref_logprobs", "rollout_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(
                    f"samples[{index}].{name} has shape {tuple(value.shape)}, expected ({n},)"
                )
        adv = torch.as_tensor(self.advantages)
        if adv.dim() not in (0, 1) or (adv.dim() == 1 and adv.shape[0] != n):
            raise ValueError(f"samples[{index}].advantages must be a scalar or shape ({n},)")
        if bool(self.loss_mask[0]):
            raise ValueError(f"samples[{index}].loss_mask[0] must be 0: no token predicts it")


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    metrics: dict[str, float]
    grad_norm: float
    num_tokens: int
    num_sequences: int
    skipped: bool
    # why the update was skipped or undone (None: applied)
    problem: str | None = None
