"""How far the trainer's log-probs are from the rollout engine's (logged every step).

With samples drawn by the engine, ``r = log pi_train - log pi_rollout`` per response token;
``k3 = exp(r) - 1 - r`` is the unbiased, non-negative estimator of KL(pi_rollout || pi_train)
(Schulman's k3). Without routing replay an MoE model's r is routing noise; with R3 it should be
numerical noise only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logprob_mismatch(train_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """``rollout/logp_abs_diff_{mean,max}`` and ``rollout/k3_kl`` over masked tokens."""
    mask = mask.bool()
    if not bool(mask.any()):
        return {"rollout/logp_abs_diff_mean": 0.0, "rollout/logp_abs_diff_max": 0.0,
                "rollout/k3_kl": 0.0}
    r = (train_logp.double() - rollout_logp.double())[mask]
    k3 = torch.expm1(r) - r
    return {
        "rollout/logp_abs_diff_mean": float(r.abs().mean()),
        "rollout/logp_abs_diff_max": float(r.abs().max()),
        "rollout/k3_kl": float(k3.mean()),
    }
