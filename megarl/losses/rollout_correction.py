"""Rollout correction: importance weights for the train-inference mismatch.

The engine samples from pi_rollout, while the loss's old policy pi_old is the trainer's
recomputation for the same tokens (kernels, precision and, without R3, MoE routing make them
differ). With the per-token log-ratio ``d_t = log pi_old(y_t) - log pi_rollout(y_t)`` the
correction is one DETACHED weight ``c`` per token, multiplying the policy loss's per-token
term: ``l_t -> c_t * l_t``. It never changes which tokens the loss clips (the clip sees
pi / pi_old as before), it composes with every loss and aggregation, and the normalisers stay
the token / sequence counts of the batch, so a split of the batch changes nothing.

Modes (`RolloutCorrection.mode`; ``lower`` / ``upper`` are bounds on the ratio):
- ``token_tis``   c_t = min(exp d_t, upper)                     truncated IS (Yao et al., 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")
- ``token_mis``   c_t = exp d_t inside [lower, upper], else 0     IcePop ("Every Step Evolves:
  Scaling Reinforcement Learning for Trillion-Scale Thinking Model", Ling Team,
  arXiv:2510.18855, the mask M(k))
- ``token_mask``  c_t = 1 inside [lower, upper], else 0          token rejection
- ``seq_tis``     c_i = min(exp sum_t d_t, upper) on every token of sequence i
- ``seq_mask``    c_i = 1 if exp sum_t d_t is inside [lower, upper], else 0
- ``geo_mask``    c_i = 1 if exp mean_t d_t (the geometric-mean ratio) is inside, else 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megarl.errors import ConfigError
from megarl.losses.batch import MAX_LOG_RATIO, masked_mean

MODES: tuple[str, ...] = ("off", "token_tis", "token_mis", "token_mask", "seq_tis", "seq_mask",
                          "geo_mask")
TRUNCATING = ("token_tis", "seq_tis")  # an upper bound only
DEFAULT_BOUNDS = {"token_tis": (None, 2.0), "seq_tis": (None, 2.0), "token_mis": (0.5, 2.0),
                  "token_mask": (0.5, 2.0), "seq_mask": (0.5, 2.0), "geo_mask": (0.5, 2.0)}


@dataclass(frozen=True)
class RolloutCorrection:
    """A validated rollout-correction mode and its ratio bounds."""

    mode: str
    lower: float | None
    upper: float

    @classmethod
    def resolve(cls, mode: str, lower: float | None = None, upper: float | None = None,
                field: str = "algo.rollout_correction") -> RolloutCorrection | None:  # fmt: skip
        """None for ``off``; else the mode with its bounds (defaults per mode), checked."""
        if mode not in MODES:
            raise ConfigError(f"{field}.mode", mode, f"must be one of {', '.join(MODES)}")
        if mode == "off":
            return None
        default_lower, default_upper = DEFAULT_BOUNDS[mode]
        upper = default_upper if upper is None else upper
        if not (isinstance(upper, int | float) and math.isfinite(upper) and upper > 1):
            raise ConfigError(f"{field}.upper", upper, "must be a finite number > 1")
        if mode in TRUNCATING:
            if lower is not None:
                raise ConfigError(f"{field}.lower", lower,
                                  f"must be null: {mode} truncates from above only")
            return cls(mode, None, float(upper))
        lower = default_lower if lower is None else lower
        if not (isinstance(lower, int | float) and 0 <= lower < 1):
            raise ConfigError(f"{field}.lower", lower, "must be a number in [0, 1)")
        return cls(mode, float(lower), float(upper))

    def weights(self, old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor,
                lengths: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """``(c [B, T], metrics)``: the detached per-token weight (0 on padding) and its
        statistics. `lengths` ``[B]`` are the tokens of each (whole) sequence."""
        with torch.no_grad():
            dtype = torch.promote_types(old_log_prob.dtype, torch.float32)
            d = torch.where(mask, old_log_prob.to(dtype) - rollout_log_prob.to(dtype), 0.0)
            d = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
            if self.mode.startswith("token"):
                ratio = d.exp()
            elif self.mode == "geo_mask":
                per_seq = d.sum(-1) / lengths.to(dtype).clamp(min=1.0)
                ratio = per_seq.exp()[:, None].expand_as(d)
            else:
                per_seq = d.sum(-1).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
                ratio = per_seq.exp()[:, None].expand_as(d)
            if self.mode in TRUNCATING:
                cut = ratio > self.upper
                weight = ratio.clamp(max=self.upper)
            else:
                cut = (ratio < self.lower) | (ratio > self.upper)
                kept = ratio if self.mode == "token_mis" else torch.ones_like(ratio)
                weight = torch.where(cut, torch.zeros_like(ratio), kept)
            weight = torch.where(mask, weight, torch.zeros_like(weight))
            seq_weight = (weight * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            has = mask.any(-1)
            metrics = {
                "rollout_corr/weight/mean": masked_mean(weight, mask),
                "rollout_corr/weight/max": (weight.masked_fill(~mask, float("-inf")).max()
                                            if bool(mask.any()) else weight.new_tensor(
                                                float("-inf"))),
                "rollout_corr/cut_frac": masked_mean(cut & mask, mask),
                "rollout_corr/ratio/mean": masked_mean(ratio, mask),
                "rollout_corr/seq_weight/mean": (seq_weight[has].mean() if bool(has.any())
                                                 else weight.new_zeros(())),
            }
            return weight, metrics
