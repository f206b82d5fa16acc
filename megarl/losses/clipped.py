"""PPO-clip objectives: GRPO, DAPO (clip-higher), Dr. GRPO, and DAPO's eps_high = inf ablation.

    J = min( w A, clip(w, 1 - eps_low, 1 + eps_high) A )                 (GRPO: Fan et al. Eq. 4;
                                                                          DAPO: eps_high = 0.28)
    dual clip (Ye et al. 2020), A < 0 only:  J = max( J, c A )           (verl's clip_ratio_c)

Gradient weight (d loss / d log pi = -A F):
    F = 0 on LN (w < 1-eps_low, A<0) and HP (w > 1+eps_high, A>0);  F = w elsewhere;
    with dual clip, also F = 0 for A<0 and w > c.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds, masked_mean
from megarl.losses.registry import Hyper, dual_clip_c, eps_high, eps_low, register_policy_loss


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    low: float | Tensor,
    high: float | Tensor,
    dual_clip_c: float | None = None,
) -> Tensor:
    """Per-token loss -min(w A, clip(w, low, high) A), dual-clipped at c for A < 0.

    Written branch by branch with strict inequalities on the detached ratio (equal in value to
    the min/clip form): A > 0 gives -A min(w, high), A < 0 gives -A max(w, low). A token exactly
    on a bound keeps its gradient, as the regions' strict definitions say; torch.clamp and
    torch.minimum would zero or halve it there.
    """
    w = ratio.detach()
    loss = -advantages * ratio
    loss = torch.where((advantages > 0) & (w > high), -advantages * high, loss)
    loss = torch.where((advantages < 0) & (w < low), -advantages * low, loss)
    if dual_clip_c is not None:
        loss = torch.where((advantages < 0) & (w > dual_clip_c), -advantages * dual_clip_c, loss)
    return loss


def dual_clip_fraction(b: LossBatch, dual_clip_c: float | None) -> dict[str, Tensor]:
    """Fraction of valid tokens whose gradient the dual clip removed (A < 0 and w > c)."""
    if dual_clip_c is None:
        return {}
    return {"clip/dual_frac": masked_mean(b.negative & (b.ratio.detach() > dual_clip_c), b.mask)}


def ppo_clip(b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float | None) -> LossTerms:
    """PPO clipped surrogate (GRPO / DAPO / Dr. GRPO share it; only defaults differ)."""
    loss = clipped_surrogate(b.ratio, b.advantages, 1.0 - eps_low, 1.0 + eps_high, dual_clip_c)
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(eps_low, eps_high),
                     dual_clip_fraction(b, dual_clip_c))


_PPO_PARAMS = dict(eps_low=eps_low(0.2), eps_high=eps_high(0.2), dual_clip_c=dual_clip_c())

register_policy_loss(
    "grpo", params=_PPO_PARAMS, default_agg="seq-mean-token-mean",
    summary="GRPO/PPO clip: -min(wA, clip(w, 1-eps_low, 1+eps_high)A), optional dual clip",
)(ppo_clip)
register_policy_loss(
    "dapo", params={**_PPO_PARAMS, "eps_high": eps_high(0.28)},
    summary="DAPO clip-higher (eps_low 0.2, eps_high 0.28), token-mean",
)(ppo_clip)
register_policy_loss(
    "dapo_eps_high_inf",
    params={**_PPO_PARAMS, "eps_high": Hyper(float("inf"), float, "upper clip (ablation: inf)",
                                             low=0.0)},
    summary="UP (Fan et al.) §5.3 ablation: DAPO with eps_high = inf (unclipped IS for A>0)",
)(ppo_clip)
register_policy_loss(
    "dr_grpo", params=_PPO_PARAMS, default_agg="seq-mean-token-sum-norm",
    summary="Dr. GRPO: PPO clip with a constant normaliser (pair with advantage=dr_grpo)",
)(ppo_clip)
