"""Sequence-level objectives: GSPO and GMPO.

Both are written in the "token form" of GSPO (arXiv 2507.18071, GSPO-token): every token of
sequence i carries the sequence-level value, and the gradient reaches log pi_{i,t} through a
straight-through factor exp(log pi - sg(log pi)). Summed over the |o_i| tokens of a sequence with
the weights of any aggregation mode (equal within a sequence), this has exactly the gradient of
the sequence objective, and the sequence statistics only enter detached — so a context-parallel
rank needs just an all-reduce of detached per-sequence sums, never a differentiable gather.

GSPO (UP, Fan et al., Eqs. 5-6), s_i = exp( (1/|o_i|) sum_t (log pi - log pi_old) ):
    J_i = min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ),   eps = 3e-4 / 4e-4
    d(sum_t l_it)/d log pi_it = -A_i s_i [s_i unclipped]          (token form, before 1/|o_i|)

GMPO (Zhao et al., arXiv 2507.20673; official code callsys/GMPO): PPO's min-clip applied per token
in LOG space, then a geometric mean per sequence, eps_low = eps_high = 0.4:
    d~_it = min(d_it, clip(d_it, -eps_low, eps_high)) if A_i > 0, max(...) if A_i < 0
    J_i   = A_i exp( (1/|o_i|) sum_t d~_it )          (d = log pi - log pi_old)
    d(sum_t l_it)/d log pi_it = -A_i s~_i [d~_it unclipped]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megarl.losses.batch import LossBatch, LossTerms, RegionBounds, sg
from megarl.losses.clipped import clipped_surrogate
from megarl.losses.registry import Hyper, dual_clip_c, eps_high, eps_low, register_policy_loss


def sequence_ratio_token_form(b: LossBatch, seq_log_ratio: Tensor) -> Tensor:
    """sg(exp(seq_log_ratio_i)) * exp(log pi_it - sg(log pi_it)): value s_i, d/dlog pi_it = s_i."""
    return torch.exp(b.log_prob - sg(b.log_prob) + sg(seq_log_ratio)[:, None])


def gspo_surrogate(
    b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float | None = None
) -> tuple[Tensor, Tensor]:
    """(sequence ratio broadcast to tokens, per-token GSPO loss)."""
    s = sequence_ratio_token_form(b, b.seq_mean(b.log_ratio))
    return s, clipped_surrogate(s, b.advantages, 1.0 - eps_low, 1.0 + eps_high, dual_clip_c)


def gspo(b: LossBatch, eps_low: float, eps_high: float, dual_clip_c: float | None) -> LossTerms:
    """GSPO: PPO clip on the length-normalised sequence ratio."""
    s, loss = gspo_surrogate(b, eps_low, eps_high, dual_clip_c)
    return LossTerms(loss, s, RegionBounds.from_eps(eps_low, eps_high), sequence_ratio=s)


register_policy_loss(
    "gspo", level="sequence", default_agg="seq-mean-token-mean",
    params=dict(eps_low=eps_low(3e-4), eps_high=eps_high(4e-4), dual_clip_c=dual_clip_c()),
    summary="GSPO: clip the length-normalised sequence ratio (eps 3e-4 / 4e-4)",
)(gspo)


def gmpo(b: LossBatch, eps_low: float, eps_high: float) -> LossTerms:
    """GMPO: geometric mean of token ratios clipped in log space."""
    d = b.log_ratio
    # min(d, clip(d)) for A > 0 is eps_high above it, d below; max(...) for A < 0 mirrors it
    clipped = torch.where(b.positive & (d.detach() > eps_high), torch.full_like(d, eps_high), d)
    clipped = torch.where(b.negative & (d.detach() < -eps_low), torch.full_like(d, -eps_low),
                          clipped)
    seq_log_ratio = b.seq_mean(clipped)
    s = torch.exp(clipped - sg(clipped) + sg(seq_log_ratio)[:, None])
    bounds = RegionBounds.symmetric(math.exp(-eps_low), math.exp(eps_high))
    # regions on the token ratio: GMPO clips tokens, not sequences
    return LossTerms(-b.advantages * s, b.ratio, bounds, sequence_ratio=s)


register_policy_loss(
    "gmpo", level="sequence", default_agg="seq-mean-token-mean",
    params=dict(eps_low=Hyper(0.4, float, "log-space lower clip: ratio >= exp(-eps_low)", low=0.0),
                eps_high=Hyper(0.4, float, "log-space upper clip: ratio <= exp(eps_high)",
                               low=0.0)),
    summary="GMPO: geometric mean of token ratios clipped in log space to [e^-0.4, e^0.4]",
)(gmpo)
