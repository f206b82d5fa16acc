"""UP: "Unbounded Positive Asymmetric Optimization for Breaking the Exploration-Stability
Dilemma" (Fan et al.), and its blog version "UP-GRPO" with reference code.

For A > 0 the importance ratio is replaced by the self-anchored ratio pi / sg(pi) (Eq. 12), whose
gradient is exactly REINFORCE's (Eq. 13): the per-token loss is -A log pi, F = 1 whatever w.
For A <= 0 the baseline's clipped objective is kept unchanged.

    UP-DAPO (Eq. 14), token-mean:           A log pi            if A > 0
                                            min(wA, clip(w, 1-eps_low, 1+eps_high)A)   if A <= 0
    UP-GRPO (Eq. 15), seq-mean-token-mean:  same two branches with eps_low = eps_high = eps
    UP-GSPO (Eq. 16 / A7), per sequence:    A (1/|o|) sum_t log pi                     if A > 0
                                            min(s A, clip(s, 1-eps, 1+eps) A)          if A <= 0

For A <= 0 the upper bound 1 + eps_high never binds (min() then picks wA), so UP has no eps_high:
the parameter is kept only to draw the HP/HN region boundary in metrics, comparable with the
baseline's. The dual clip c of the 001 reference code is available (default off, as in Eqs. 14-16).

Probability capacity (metrics): for A > 0, UP's Cap = 1 - pi (Sec. 4.1) against the clipped
baseline's Eq. 11, Cap = min(1, (1+eps_high) pi_old) - pi if pi < (1+eps_high) pi_old else 0; for
A <= 0, Eq. A3: pi - (1-eps_low) pi_old inside [(1-eps_low) pi_old, c pi_old], else 0.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds, conditional_mean
from megarl.losses.clipped import clipped_surrogate, dual_clip_fraction
from megarl.losses.registry import dual_clip_c, eps_high, eps_low, register_policy_loss
from megarl.losses.sequence import gspo_surrogate


def probability_capacity(
    b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float | None
) -> dict[str, Tensor]:
    """Mean probability capacity of UP (1 - pi) and of the clipped baseline (Eq. 11 / A3)."""
    with torch.no_grad():
        pi, pi_old = b.log_prob.exp(), b.old_log_prob.exp()
        pos, neg = b.positive & b.mask, (b.advantages <= 0) & b.mask
        ceiling = (1.0 + eps_high) * pi_old
        cap_clipped_pos = torch.where(pi < ceiling, ceiling.clamp(max=1.0) - pi,
                                      torch.zeros_like(pi))
        floor = (1.0 - eps_low) * pi_old
        top = math.inf if dual_clip_c is None else dual_clip_c
        inside = (pi >= floor) & (pi <= top * pi_old)
        cap_neg = torch.where(inside, pi - floor, torch.zeros_like(pi))
        return (conditional_mean("up/cap_pos", 1.0 - pi, pos)
                | conditional_mean("up/cap_pos_clipped_baseline", cap_clipped_pos, pos)
                | conditional_mean("up/cap_neg", cap_neg, neg))


def up_token(b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float | None) -> LossTerms:
    """UP-GRPO / UP-DAPO: -A log pi for A > 0, the PPO clip (+ dual clip) for A <= 0."""
    positive = -b.advantages * b.log_prob
    negative = clipped_surrogate(b.ratio, b.advantages, 1.0 - eps_low, 1.0 + eps_high,
                                 dual_clip_c)
    loss = torch.where(b.positive, positive, negative)
    metrics = {**probability_capacity(b, eps_low, eps_high, dual_clip_c),
               **dual_clip_fraction(b, dual_clip_c)}
    return LossTerms(loss, b.ratio, RegionBounds.from_eps(eps_low, eps_high), metrics)


def up_sequence(b: LossBatch, eps_low: float, eps_high: float,
                dual_clip_c: float | None) -> LossTerms:
    """UP-GSPO (Eq. A7): per token -A log pi for A > 0 (averaged per sequence by the
    seq-mean-token-mean aggregation, this is A (1/|o|) sum_t log pi); GSPO for A <= 0."""
    seq_ratio, negative = gspo_surrogate(b, eps_low, eps_high, dual_clip_c)
    loss = torch.where(b.positive, -b.advantages * b.log_prob, negative)
    metrics = probability_capacity(b, eps_low, eps_high, dual_clip_c)
    return LossTerms(loss, seq_ratio, RegionBounds.from_eps(eps_low, eps_high), metrics,
                     sequence_ratio=seq_ratio)


_UP_DOC = "only the HP/HN metric boundary: UP's gradient has no upper clip"

register_policy_loss(
    "up_grpo", default_agg="seq-mean-token-mean",
    params=dict(eps_low=eps_low(0.2), eps_high=replace(eps_high(0.2), doc=_UP_DOC),
                dual_clip_c=dual_clip_c()),
    summary="UP-GRPO (Fan et al., Eq. 15): -A log pi for A>0, GRPO clip for A<=0",
)(up_token)
register_policy_loss(
    "up_dapo",
    params=dict(eps_low=eps_low(0.2), eps_high=replace(eps_high(0.28), doc=_UP_DOC),
                dual_clip_c=dual_clip_c()),
    summary="UP-DAPO (Fan et al., Eq. 14): -A log pi for A>0, DAPO clip for A<=0, token-mean",
)(up_token)
register_policy_loss(
    "up_gspo", level="sequence", default_agg="seq-mean-token-mean",
    params=dict(eps_low=eps_low(3e-4), eps_high=replace(eps_high(4e-4), doc=_UP_DOC),
                dual_clip_c=dual_clip_c()),
    summary="UP-GSPO (Fan et al., Eq. 16/A7): length-normalised log-likelihood for A>0, GSPO "
            "for A<=0",
)(up_sequence)
