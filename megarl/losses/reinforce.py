"""Ratio-free policy gradients: REINFORCE, W-REINFORCE, and seed 000's symmetric ablation.

    REINFORCE (seed 000 Eq. 1):  J = A log pi                      F = 1
    up_symmetric (seed 000 §5.3): the same loss used off-policy over every mini-batch update of
        a rollout batch: UP's self-anchored ratio pi/sg(pi) applied to both signs of A.
    W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347): J = lambda A log pi if A > 0, A log pi
        otherwise (F = lambda on positive tokens, 1 elsewhere; lambda = 0.1). The paper uses the
        raw rewards +-1 as A (advantage estimator ``raw``).
"""

from __future__ import annotations

import torch

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds
from megarl.losses.registry import Hyper, register_policy_loss

_NO_CLIP = RegionBounds.from_eps(0.2, 0.2)  # regions are reported at the usual +-0.2 band


def reinforce(b: LossBatch) -> LossTerms:
    """-A log pi: the on-policy policy gradient, F = 1 on every token."""
    return LossTerms(-b.advantages * b.log_prob, b.ratio, _NO_CLIP)


def w_reinforce(b: LossBatch, lam: float) -> LossTerms:
    """Positive samples down-weighted by lambda."""
    scale = torch.where(b.positive, torch.full_like(b.advantages, lam),
                        torch.ones_like(b.advantages))
    return LossTerms(-scale * b.advantages * b.log_prob, b.ratio, _NO_CLIP)


register_policy_loss("reinforce", params={},
                     summary="REINFORCE: -A log pi (no ratio, no clip)")(reinforce)
register_policy_loss(
    "up_symmetric", params={},
    summary="seed 000 §5.3 ablation: unbounded self-anchored update for both signs of A",
)(reinforce)
register_policy_loss(
    "w_reinforce",
    params=dict(lam=Hyper(0.1, float, "weight of positive samples", low=0.0)),
    summary="W-REINFORCE: lambda A log pi for A>0 (lambda 0.1), A log pi otherwise",
)(w_reinforce)
