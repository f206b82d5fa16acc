"""Per-token KL(pi_theta || pi_ref) estimators for the GRPO-family ``beta`` term.

With x = log pi_ref - log pi (Schulman, "Approximating KL divergence", 2020):
- k1 = -x                     unbiased, can be negative;
- k2 = x^2 / 2                biased, low variance;
- k3 = exp(x) - x - 1         unbiased, always >= 0 (GRPO's choice, DeepSeekMath Eq. 4).
The difference x is clamped to +-20 before exp (as verl and NeMo-RL do) so k3 stays finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3")
_MAX_KL_LOG_DIFF = 20.0


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate, differentiable w.r.t. `log_prob`."""
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    x = (ref_log_prob.detach().to(dtype) - log_prob.to(dtype)).clamp(-_MAX_KL_LOG_DIFF,
                                                                     _MAX_KL_LOG_DIFF)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x.square()
    if kind == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"kl_type={kind!r}: must be one of {', '.join(KL_TYPES)}")
