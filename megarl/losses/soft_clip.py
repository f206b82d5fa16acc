"""Soft clipping: the gradient outside the trust region is reweighted, not zeroed.

Each objective is given by its log-prob gradient weight F (DGPO, Fu et al., arXiv:2603.14389,
Eqs. 2-10; d loss/d log pi = -A F) and implemented with the log-space surrogate
-A exp(log pi - sg(log pi) + sg(log F)) (value -A F), except CISPO, which keeps MiniMax-M1's own
form -sg(clip(w)) A log pi.

    CISPO   F = clip(w, 1-eps_low, 1+eps_high)                  every token, both signs
    GPPO    F = 1-eps_low on LN, 1+eps_high on HP, w elsewhere   (CE-GPPO with beta1=beta2=1)
    CE-GPPO F = beta1 (1-eps_low) on LN, beta2 (1+eps_high) on HP, w elsewhere
    DGPO    F = w^(n+1) / (1-eps_low)^n on LN,
              (1+eps_high)^(1/m) w^(1-1/m) on HP, w elsewhere (no dual clip)
            i.e. probability-space weights C_left pi^n and C_right pi^(-1/m) (Eqs. 9-10, 20, 23),
            computed in log space so that log pi_old = -80 stays finite.
    SAPO    soft gate J = (4/tau) sigmoid(tau (w - 1)) A, tau = tau_pos (1.0) if A > 0 else
            tau_neg (1.05) (Gao et al., arXiv 2511.20347): F = 4 s (1 - s) w, s = sigmoid(tau(w-1));
            F = 1 on-policy, decaying smoothly away from w = 1; no hard clip.

CISPO's defaults follow MiniMax-M1 (no lower bound; eps_high 0.2 as verl's example, the paper
does not state its tuned value); DGPO (Fu et al., arXiv:2603.14389) ran it with
eps_low = eps_high = 0.2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megarl.losses.batch import (
    LossBatch,
    LossTerms,
    RegionBounds,
    conditional_mean,
    sg,
    weighted_log_prob_term,
    with_gradient_weight,
)
from megarl.losses.metrics import region_masks
from megarl.losses.registry import Hyper, eps_high, eps_low, register_policy_loss


def regions(b: LossBatch, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Masks of the two boundary regions that soft clipping reweights: (LN, HP), decided
    exactly as the region metrics decide them."""
    masks = region_masks(b.ratio, b.advantages, b.mask, RegionBounds.from_eps(eps_low, eps_high))
    return masks["LN"], masks["HP"]


def soft_clip_terms(b: LossBatch, log_weight: Tensor, eps_low: float, eps_high: float,
                    metrics: dict[str, Tensor] | None = None) -> LossTerms:
    """-A F through the log-space surrogate, for a given log F."""
    loss = -b.advantages * weighted_log_prob_term(b.log_prob, log_weight)
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(eps_low, eps_high), metrics or {})


def cispo(b: LossBatch, eps_low: float, eps_high: float) -> LossTerms:
    """CISPO (MiniMax-M1): REINFORCE with a clipped, stop-gradient IS weight."""
    weight = sg(b.ratio).clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -b.advantages * weight * b.log_prob
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(min(eps_low, 1.0), eps_high))


def ce_gppo(b: LossBatch, eps_low: float, eps_high: float, beta1: float,
            beta2: float) -> LossTerms:
    """CE-GPPO (GPPO when beta1 = beta2 = 1): gradient-preserving clip with scaled boundaries."""
    ln, hp = regions(b, eps_low, eps_high)
    log_weight = b.log_ratio.detach()
    log_weight = torch.where(ln, _log(beta1 * (1.0 - eps_low)), log_weight)
    log_weight = torch.where(hp, _log(beta2 * (1.0 + eps_high)), log_weight)
    return soft_clip_terms(b, log_weight, eps_low, eps_high)


def dgpo(b: LossBatch, eps_low: float, eps_high: float, n: int, m: int) -> LossTerms:
    """DGPO: polynomial decay of the probability-space weight on LN, reciprocal-radical on HP."""
    ln, hp = regions(b, eps_low, eps_high)
    delta = b.log_ratio.detach()
    log_weight = torch.where(ln, (n + 1) * delta - n * math.log1p(-eps_low), delta)
    log_weight = torch.where(hp, math.log1p(eps_high) / m + (1.0 - 1.0 / m) * delta, log_weight)
    kappa = torch.exp(log_weight - delta)  # F / w = W pi_old, the probability-space weight
    metrics = (conditional_mean("dgpo/weight_over_ratio_LN", kappa, ln)
               | conditional_mean("dgpo/weight_over_ratio_HP", kappa, hp))
    return soft_clip_terms(b, log_weight, eps_low, eps_high, metrics)


def sapo(b: LossBatch, tau_pos: float, tau_neg: float) -> LossTerms:
    """SAPO: a sigmoid gate of the token ratio with a sign-dependent temperature."""
    tau = torch.where(b.positive, torch.full_like(b.advantages, tau_pos),
                      torch.full_like(b.advantages, tau_neg))
    z = tau * (b.ratio.detach() - 1.0)
    gate = (4.0 / tau) * torch.sigmoid(z)
    # F = 4 sigma(z) sigma(-z) w, in log space: no 1 - sigma cancellation when the gate saturates
    log_f = math.log(4.0) + F.logsigmoid(z) + F.logsigmoid(-z) + b.log_ratio.detach()
    term = with_gradient_weight(gate, b.log_prob, log_f)
    return LossTerms(-b.advantages * term, b.ratio, RegionBounds.from_eps(0.2, 0.2))


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


register_policy_loss(
    "cispo",
    params=dict(
        eps_low=Hyper(1.0, float, "lower IS-weight clip 1 - eps_low (1: no lower bound, as "
                      "MiniMax-M1)", low=0.0, high=1.0),
        eps_high=eps_high(0.2),
    ),
    summary="CISPO (MiniMax-M1): -sg(clip(w)) A log pi, gradient kept on every token",
)(cispo)


def _gppo_params(beta1: float) -> dict[str, Hyper]:
    """GPPO and CE-GPPO share one objective; only beta1's default differs (1 vs 0.75)."""
    scale = "scale of the boundary weight"
    return dict(eps_low=eps_low(0.2), eps_high=eps_high(0.2),
                beta1=Hyper(beta1, float, f"LN {scale}", low=0.0),
                beta2=Hyper(1.0, float, f"HP {scale}", low=0.0))


register_policy_loss(
    "ce_gppo", params=_gppo_params(0.75),
    summary="CE-GPPO: F = beta1(1-eps_low) on LN, beta2(1+eps_high) on HP, w elsewhere",
)(ce_gppo)
register_policy_loss(
    "gppo", params=_gppo_params(1.0),
    summary="GPPO (Klear): F = 1-eps_low on LN, 1+eps_high on HP, w elsewhere",
)(ce_gppo)
register_policy_loss(
    "dgpo",
    params=dict(eps_low=eps_low(0.2), eps_high=eps_high(0.2),
                n=Hyper(1, int, "LN polynomial decay order (0: no LN clip)", low=0),
                m=Hyper(2, int, "HP reciprocal-radical order (1: GPPO on HP)", low=1)),
    summary="DGPO (Fu et al., arXiv:2603.14389, Eqs. 9-10): F = w^(n+1)/(1-eps_low)^n on LN, "
            "(1+eps_high)^(1/m) w^(1-1/m) on HP",
)(dgpo)
register_policy_loss(
    "sapo", default_agg="seq-mean-token-mean",
    params=dict(tau_pos=Hyper(1.0, float, "gate temperature for A>0", low=0.0, low_open=True),
                tau_neg=Hyper(1.05, float, "gate temperature for A<=0", low=0.0, low_open=True)),
    summary="SAPO: soft sigmoid gate (4/tau) sigmoid(tau(w-1)), tau 1.0 / 1.05",
)(sapo)
