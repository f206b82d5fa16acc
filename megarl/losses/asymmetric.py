"""Sign-asymmetric trust regions: ASPO and DPPO (baselines in UP, Fan et al., Table 1).

ASPO (Wang et al., arXiv 2510.06062; official code wizard-III/Archer2.0
``compute_policy_loss_archer``): for A > 0 the IS ratio is flipped to pi_old pi / sg(pi^2)
(value 1/w, gradient weight 1/w), with PPO's hard masks and a soft dual clip at c on both signs:
    A > 0:  F = 0 if w > 1+eps_high;  1/w if 1/c <= w <= 1+eps_high;  c if w < 1/c
    A < 0:  F = 0 if w < 1-eps_low;   w   if 1-eps_low <= w <= c;     c if w > c
DGPO's "eps'_low = 0.33, eps'_high = 3" are these thresholds 1/c and c; the soft-clipped weight
is c on both sides (the code), not 1-0.33 / 1+3 (DGPO Eq. 6 as printed). Defaults: eps 0.2, c 3,
token-mean. Archer's entropy-dependent eps split is not implemented.

DPPO (Qi et al., arXiv 2602.04879; code sail-sg/Stable-RL, verl ``dppo_tv``/``dppo_kl``): the
ratio clip is replaced by a divergence trust region on the sampled token, dropping a token only
when it left the region in the direction its advantage pushes (p = pi, p_old = pi_old):
    binary_tv:  out for A > 0 if p - p_old > delta_high;   for A <= 0 if p - p_old < -delta_low
    binary_kl:  D = KL(Bern(p_old) || Bern(p)); out for A > 0 if D > delta_high and p > p_old,
                for A <= 0 if D > delta_low and p < p_old
    F = min(w, cap) inside, 0 outside (no dual clip; the authors disable the cap: default none).
Defaults: binary_tv with delta 0.15 (binary_kl: 0.05). Which log-probs anchor the region (rollout
engine's or recomputed) is the trainer's choice of `old_log_prob`.

Both are implemented with the log-space surrogate -A exp(log pi - sg(log pi) + sg(log F)): the
value is -A F (the IS policy-gradient value), the gradient exactly -A F.
"""

from __future__ import annotations

import math

import torch

from megarl.errors import ConfigError
from megarl.losses.batch import (
    LossBatch,
    LossTerms,
    RegionBounds,
    masked_mean,
    weighted_log_prob_term,
)
from megarl.losses.registry import Hyper, eps_high, eps_low, register_policy_loss


def aspo(b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float) -> LossTerms:
    """ASPO: flipped ratio 1/w for A > 0, PPO masks, soft dual clip c on both signs."""
    delta, w = b.log_ratio.detach(), b.ratio.detach()
    log_c = math.log(dual_clip_c)
    minus_inf, at_c = torch.full_like(delta, -math.inf), torch.full_like(delta, log_c)
    log_f_pos = torch.where(w > 1.0 + eps_high, minus_inf,
                            torch.where(w < 1.0 / dual_clip_c, at_c, -delta))
    log_f_neg = torch.where(w < 1.0 - eps_low, minus_inf,
                            torch.where(w > dual_clip_c, at_c, delta))
    log_f = torch.where(b.positive, log_f_pos, log_f_neg)
    loss = -b.advantages * weighted_log_prob_term(b.log_prob, log_f)
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(eps_low, eps_high))


def dppo(b: LossBatch, variant: str, delta_low: float, delta_high: float,
         ratio_cap: float | None) -> LossTerms:
    """DPPO: IS policy gradient masked by a binary TV / KL trust region on the sampled token."""
    with torch.no_grad():
        p, p_old = b.log_prob.exp(), b.old_log_prob.exp()
        if variant == "binary_tv":
            out_pos, out_neg = (p - p_old) > delta_high, (p - p_old) < -delta_low
        else:
            tiny = 1e-8
            div = p_old * (b.old_log_prob - b.log_prob) + (1 - p_old) * torch.log(
                (1 - p_old + tiny) / (1 - p + tiny))
            out_pos, out_neg = (div > delta_high) & (p > p_old), (div > delta_low) & (p < p_old)
        out = torch.where(b.positive, out_pos, out_neg)
        log_f = b.log_ratio.detach()
        if ratio_cap is not None:
            log_f = log_f.clamp(max=math.log(ratio_cap))
        log_f = torch.where(out, torch.full_like(log_f, -math.inf), log_f)
    loss = -b.advantages * weighted_log_prob_term(b.log_prob, log_f)
    metrics = {"dppo/masked_frac": masked_mean(out & (b.advantages != 0), b.mask)}
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(0.2, 0.2), metrics)


def _check_dppo(params: dict, field: str) -> None:
    if params["variant"] == "binary_tv":
        for key in ("delta_low", "delta_high"):
            if params[key] >= 1.0:
                raise ConfigError(f"{field}.{key}", params[key],
                                  "a total-variation threshold must be < 1")


register_policy_loss(
    "aspo",
    params=dict(eps_low=eps_low(0.2), eps_high=eps_high(0.2),
                dual_clip_c=Hyper(3.0, float, "soft dual clip: F = c beyond w = c (A<0) and "
                                  "w = 1/c (A>0)", low=1.0, low_open=True)),
    summary="ASPO: flipped IS ratio 1/w for A>0, PPO masks, soft dual clip c = 3 both signs",
)(aspo)
register_policy_loss(
    "dppo", check=_check_dppo,
    params=dict(
        variant=Hyper("binary_tv", str, "trust-region divergence",
                      choices=("binary_tv", "binary_kl")),
        delta_low=Hyper(0.15, float, "threshold for tokens pushed down (A<=0)", low=0.0,
                        low_open=True),
        delta_high=Hyper(0.15, float, "threshold for tokens pushed up (A>0)", low=0.0,
                         low_open=True),
        ratio_cap=Hyper(None, float, "truncate the IS weight at this value", low=0.0,
                        low_open=True, optional=True),
    ),
    summary="DPPO: IS gradient masked by a binary TV/KL trust region (delta 0.15)",
)(dppo)
