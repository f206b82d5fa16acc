"""Ratio-free policy gradients: REINFORCE, W-REINFORCE, and UP's symmetric ablation (Fan et al.).

    REINFORCE (UP, Fan et al., Eq. 1):  J = A log pi                      F = 1
    up_symmetric (UP, Fan et al., §5.3): the same loss used off-policy over every mini-batch
        update of
        a rollout batch: UP's self-anchored ratio pi/sg(pi) applied to both signs of A.
    W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347): lambda * PSR + NSR — positive samples
        weighted by lambda = 0.1. As in the official code (TianHongZXY/RLVR-Decomposed), it runs
        through the PPO clip (eps 0.2), which equals REINFORCE on-policy: F = lambda * F_ppo for
        A > 0 and F_ppo otherwise. The paper's advantages are +1 / -1 for correct / wrong
        samples, no baseline (advantage estimator ``psr_nsr``).
"""

from __future__ import annotations

import torch

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds
from megarl.losses.clipped import clipped_surrogate
from megarl.losses.registry import Hyper, eps_high, eps_low, register_policy_loss

_NO_CLIP = RegionBounds.from_eps(0.2, 0.2)  # regions are reported at the usual +-0.2 band


def reinforce(b: LossBatch) -> LossTerms:
    """-A log pi: the on-policy policy gradient, F = 1 on every token."""
    return LossTerms(-b.advantages * b.log_prob, b.ratio, _NO_CLIP)


def w_reinforce(b: LossBatch, lam: float, eps_low: float, eps_high: float) -> LossTerms:
    """Positive samples down-weighted by lambda, PPO-clipped like the official code."""
    scale = torch.where(b.positive, torch.full_like(b.advantages, lam),
                        torch.ones_like(b.advantages))
    loss = clipped_surrogate(b.ratio, scale * b.advantages, 1.0 - eps_low, 1.0 + eps_high)
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(eps_low, eps_high))


register_policy_loss("reinforce", params={},
                     summary="REINFORCE: -A log pi (no ratio, no clip)")(reinforce)
register_policy_loss(
    "up_symmetric", params={},
    summary="UP (Fan et al.) §5.3 ablation: unbounded self-anchored update for both signs of A",
)(reinforce)
register_policy_loss(
    "w_reinforce",
    params=dict(lam=Hyper(0.1, float, "weight of positive samples", low=0.0),
                eps_low=eps_low(0.2), eps_high=eps_high(0.2)),
    summary="W-REINFORCE: positives weighted by lambda = 0.1, PPO clip 0.2 (official code)",
)(w_reinforce)
