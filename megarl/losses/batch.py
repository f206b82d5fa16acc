"""The inputs every policy loss sees, prepared once: fp32, masked, with the ratio in log space.

Conventions (used by every loss module):
- tensors are ``[batch, response_len]``; ``A`` is the advantage broadcast to every token;
- ``log_ratio`` = log pi - log pi_old, computed in fp32 (fp64 inputs stay fp64) and clamped
  to +-MAX_LOG_RATIO (only to keep exp() finite; the clamp never binds for ratios a trainer
  can meet), and zero on masked positions so that padding (even NaN padding) never reaches a
  sum;
- ``ratio`` = w = exp(log_ratio); never computed as pi / pi_old.
- ``sg`` is stop-gradient (``.detach()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

MAX_LOG_RATIO = 60.0  # exp(60) ~ 1e26: finite in fp32 (max ~3.4e38), far beyond any real ratio


@dataclass
class RegionBounds:
    """Ratio thresholds that define the five regions, per advantage sign.

    LN: w < low_neg and A<0;  HP: w > high_pos and A>0;  LP: w < low_pos and A>0;
    HN: w > high_neg and A<0;  M: everything else (including every A == 0 token).
    """

    low_pos: float | Tensor
    high_pos: float | Tensor
    low_neg: float | Tensor
    high_neg: float | Tensor

    @classmethod
    def symmetric(cls, low: float | Tensor, high: float | Tensor) -> RegionBounds:
        return cls(low, high, low, high)

    @classmethod
    def from_eps(cls, eps_low: float, eps_high: float) -> RegionBounds:
        return cls.symmetric(1.0 - eps_low, 1.0 + eps_high)


@dataclass
class LossTerms:
    """What a loss function returns.

    `loss_mat`: per-token loss (to minimise) before aggregation, zero where masked;
    `ratio`: the ratio the loss clips and the regions are defined on (token w; GSPO's sequence
    ratio broadcast to its tokens); `bounds`: the loss's own region thresholds;
    `sequence_ratio`: a sequence-level loss's ratio per token, for metrics;
    `metrics`: loss-specific scalars.
    """

    loss_mat: Tensor
    ratio: Tensor
    bounds: RegionBounds
    metrics: dict[str, Tensor] = field(default_factory=dict)
    sequence_ratio: Tensor | None = None


@dataclass
class LossBatch:
    """Prepared inputs. Build with `LossBatch.prepare`."""

    log_prob: Tensor  # fp32, differentiable
    old_log_prob: Tensor  # fp32, detached
    advantages: Tensor  # fp32 [B, T], detached
    mask: Tensor  # bool [B, T]
    log_ratio: Tensor  # fp32 [B, T], 0 where masked
    lengths: Tensor  # fp32 [B]: tokens per sequence used by sequence means (>= 1)
    process_group: Any = None  # data-parallel group for losses that need batch statistics

    @property
    def maskf(self) -> Tensor:
        return self.mask.to(self.log_prob.dtype)

    @cached_property
    def ratio(self) -> Tensor:
        """w = exp(log pi - log pi_old), differentiable (computed once per batch)."""
        return torch.exp(self.log_ratio)

    @property
    def positive(self) -> Tensor:
        return self.advantages > 0

    @property
    def negative(self) -> Tensor:
        return self.advantages < 0

    def seq_mean(self, x: Tensor) -> Tensor:
        """(1/|o_i|) sum_t x_{i,t} over valid tokens: ``[B, T] -> [B]``."""
        return (x * self.maskf).sum(-1) / self.lengths

    @classmethod
    def prepare(
        cls,
        log_prob: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        seq_lengths: Tensor | None = None,
        process_group: Any = None,
    ) -> LossBatch:
        if log_prob.dim() != 2:
            raise ValueError(f"log_prob must be [batch, response_len], got {tuple(log_prob.shape)}")
        shape = log_prob.shape
        for name, t in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
            if t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, log_prob {tuple(shape)}")
        mask = response_mask.bool()
        # At least fp32 (bf16 log-probs are too coarse for ratios near 1); fp64 stays fp64.
        dtype = torch.promote_types(log_prob.dtype, torch.float32)
        adv = advantages.detach().to(dtype)
        if adv.dim() == 1:
            adv = adv[:, None]
        if adv.shape != shape:
            try:
                adv = adv.expand(shape)
            except RuntimeError:
                raise ValueError(f"advantages has shape {tuple(advantages.shape)}: expected "
                                 f"[batch] or {list(shape)}") from None
        adv = torch.where(mask, adv, torch.zeros_like(adv))
        lp = log_prob.to(dtype)
        old = old_log_prob.detach().to(dtype)
        zero = torch.zeros_like(lp)
        lp_safe = torch.where(mask, lp, zero)
        old_safe = torch.where(mask, old, zero.detach())
        log_ratio = (lp_safe - old_safe).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        if seq_lengths is None:
            lengths = mask.sum(-1).to(dtype)
        else:
            lengths = seq_lengths.detach().to(device=lp.device, dtype=dtype)
        return cls(lp_safe, old_safe, adv, mask, log_ratio, lengths.clamp(min=1.0), process_group)


WEIGHT_SUFFIX = "@weight"  # metrics[name + WEIGHT_SUFFIX]: the token count behind metrics[name]


def conditional_mean(name: str, x: Tensor, where: Tensor) -> dict[str, Tensor]:
    """``{name: mean of x where where, name@weight: how many}``: a mean over a subset of the
    tokens (a region, the positive tokens), which `megarl.metrics.MetricAccumulator` weights by
    its own count, so that micro-batches and ranks combine into the mean over the whole batch
    whatever the split (a micro-batch's token count would over-weight one with few such
    tokens)."""
    return {name: masked_mean(x, where), name + WEIGHT_SUFFIX: where.sum().float()}


def masked_mean(x: Tensor, where: Tensor) -> Tensor:
    """Mean of `x` over the positions where `where` is true (0 when there are none); with
    ``x`` a boolean mask and ``where`` the response mask, the fraction of valid tokens."""
    w = where.to(torch.promote_types(x.dtype, torch.float32))
    return (x * w).sum() / w.sum().clamp(min=1.0)


def sg(x: Tensor) -> Tensor:
    """Stop-gradient."""
    return x.detach()


def weighted_log_prob_term(log_prob: Tensor, log_weight: Tensor) -> Tensor:
    """exp(log pi - sg(log pi) + sg(log F)): value F, gradient w.r.t. log pi exactly F.

    The generic surrogate (``w * sg(F / w)``) written in log space, so it
    stays finite when F or w alone would overflow (DGPO with log pi_old = -80).
    """
    return torch.exp(log_prob - sg(log_prob) + sg(log_weight))


def with_gradient_weight(value: Tensor, log_prob: Tensor, log_weight: Tensor) -> Tensor:
    """A term whose value is `value` (detached) and whose gradient w.r.t. log pi is exactly F.

    For objectives whose autograd derivative loses precision in fp32 (SAPO's sigmoid slope
    sigma(1 - sigma) near saturation) while F itself has a stable closed form.
    """
    term = weighted_log_prob_term(log_prob, log_weight)
    return sg(value) + term - sg(term)
