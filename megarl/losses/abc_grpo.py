"""ABC-GRPO (Liu and Chen, arXiv:2601.03895, Eqs. 5-8): four independent clip bounds and no min().

    r~ = clip(w, 1 - eps2, 1 + eps1)   if A > 0      (eps1: Q1 upper, eps2: Q2 lower)
       = clip(w, 1 - eps4, 1 + eps3)   if A <= 0     (eps3: Q4 upper, eps4: Q3 lower)
    J  = r~ A                                          (Alg. 1 line 9: loss = -r~ A)

F = w strictly inside the sign's band, 0 outside — for both signs, so LP (Q2) and HN (Q4) get
no gradient either (GRPO gives them F = w). A = 0 takes the "<= 0" branch (its loss is 0).
GRPO is the special case eps2 >= 1, eps3 = inf. All four are 0.2 in every experiment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds, masked_mean
from megarl.losses.registry import Hyper, register_policy_loss


def abc_grpo(b: LossBatch, eps1: float, eps2: float, eps3: float, eps4: float) -> LossTerms:
    """-clip(w, lo(A), hi(A)) A."""
    pos = b.positive
    lo = torch.where(pos, 1.0 - eps2, 1.0 - eps4)
    hi = torch.where(pos, 1.0 + eps1, 1.0 + eps3)
    w = b.ratio
    wd = w.detach()
    # gradient strictly inside the band only (Eqs. 9-13); outside, the clipped constant
    loss = torch.where(wd <= lo, -lo * b.advantages,
                       torch.where(wd >= hi, -hi * b.advantages, -w * b.advantages))
    nonzero = b.advantages != 0

    def frac(x: Tensor) -> Tensor:
        return masked_mean(x & nonzero, b.mask)

    metrics = {  # the paper's quadrant split of clipped tokens
        "abc/ppo_style_frac": frac((pos & (wd >= hi)) | (~pos & (wd <= lo))),  # Q1 + Q3
        "abc/overcorrection_frac": frac((pos & (wd <= lo)) | (~pos & (wd >= hi))),  # Q2 + Q4
    }
    return LossTerms(loss, w, RegionBounds(1.0 - eps2, 1.0 + eps1, 1.0 - eps4, 1.0 + eps3),
                     metrics)


def _eps(doc: str) -> Hyper:
    return Hyper(0.2, float, doc, low=0.0)


register_policy_loss(
    "abc_grpo", default_agg="seq-mean-token-mean",
    params=dict(eps1=_eps("A>0 upper bound 1+eps1 (Q1)"), eps2=_eps("A>0 lower bound 1-eps2 (Q2)"),
                eps3=_eps("A<=0 upper bound 1+eps3 (Q4)"),
                eps4=_eps("A<=0 lower bound 1-eps4 (Q3)")),
    summary="ABC-GRPO (Liu and Chen, arXiv:2601.03895): -clip(w, sign-dependent band) A, "
            "four bounds, no min()",
)(abc_grpo)
