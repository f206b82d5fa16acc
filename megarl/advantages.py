"""Advantage estimators for outcome rewards (one scalar reward per response), and DAPO's
dynamic-sampling filter.

Responses are grouped by prompt with `group_ids` (any integer per response; groups need not be
contiguous or equal-sized, e.g. after filtering). Each estimator returns one advantage per
response (``[B]``), broadcast to its tokens by the loss.

- ``grpo``         (r - mean_g) / (std_g + eps), std with Bessel's correction (DeepSeekMath;
                   torch.std, as verl)
- ``dr_grpo``      r - mean_g                              (Dr. GRPO: no std, no length bias)
- ``rloo``         r_i - mean_{j != i, j in g} r_j = n/(n-1) (r_i - mean_g)   (Ahmadian et al.)
- ``reinforce_pp`` (r - mean_B) / (std_B + eps) over the whole batch (REINFORCE++, global
                   normalisation; token-weighted when `response_mask` is given, as the
                   reference implementations whiten token returns)
- ``reinforce_pp_baseline``  r - mean_g, then whitened over the batch as above
- ``psr_nsr``      +1 for a correct response (r > threshold), -1 otherwise (W-REINFORCE's
                   PSR / NSR signs; the loss applies lambda)
- ``raw``          r
A group of one response has no baseline: its group-relative advantage is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.errors import ConfigError

ADVANTAGE_ESTIMATORS: tuple[str, ...] = (
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "psr_nsr",
    "raw",
)


def group_statistics(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response (group mean, group unbiased std, group size), each ``[B]``."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    count = zeros.scatter_add(0, inverse, torch.ones_like(values))
    mean = zeros.scatter_add(0, inverse, values) / count
    centred = values - mean[inverse]
    sq = zeros.scatter_add(0, inverse, centred.square())
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[inverse], std[inverse], count[inverse]


def _whiten(x: Tensor, weights: Tensor, eps: float) -> Tensor:
    """(x - mean) / (std + eps) with weighted statistics (unbiased in the weight count)."""
    total = weights.sum()
    mean = (weights * x).sum() / total
    var = (weights * (x - mean).square()).sum() / (total - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps)


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    group_size: int | None = None,
    response_mask: Tensor | None = None,
    eps: float = 1e-6,
    threshold: float = 0.5,
) -> Tensor:
    """Advantages ``[B]`` of estimator `name` for `rewards` ``[B]``.

    Give `group_ids` ``[B]``, or `group_size` for contiguous groups of equal size.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ConfigError("algo.advantage", name,
                          f"must be one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1)
    if name == "raw":
        return r
    if name == "psr_nsr":
        return torch.where(r > threshold, torch.ones_like(r), -torch.ones_like(r))
    if name == "reinforce_pp":
        return _whiten(r, _token_weights(r, response_mask), eps)
    ids = _group_ids(r, group_ids, group_size)
    mean, std, count = group_statistics(r, ids)
    single = count < 2
    zero = torch.zeros_like(r)
    if name == "grpo":
        return torch.where(single, zero, (r - mean) / (std + eps))
    if name == "dr_grpo":
        return r - mean
    if name == "rloo":
        return torch.where(single, zero, (r - mean) * count / (count - 1).clamp(min=1))
    # reinforce_pp_baseline
    return _whiten(r - mean, _token_weights(r, response_mask), eps)


def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor | None = None, *,
                          group_size: int | None = None) -> Tensor:
    """DAPO's dynamic sampling: True for responses whose group has non-zero reward variance
    (a group that is all-correct or all-wrong gives every response a zero advantage)."""
    r = rewards.detach().reshape(-1).double()
    ids = _group_ids(r, group_ids, group_size)
    _, inverse = torch.unique(ids, return_inverse=True)
    n = int(inverse.max().item()) + 1 if inverse.numel() else 0
    high = torch.full((n,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, inverse, r, "amax")
    low = torch.full((n,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, inverse, r, "amin")
    return (high > low)[inverse]


def _group_ids(r: Tensor, group_ids: Tensor | None, group_size: int | None) -> Tensor:
    if group_ids is not None:
        if group_ids.numel() != r.numel():
            raise ValueError(f"group_ids has {group_ids.numel()} entries, rewards {r.numel()}")
        return group_ids.reshape(-1).to(r.device)
    if group_size is None or group_size < 1 or r.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide the {r.numel()} rewards")
    return torch.arange(r.numel(), device=r.device) // group_size


def _token_weights(r: Tensor, response_mask: Tensor | None) -> Tensor:
    if response_mask is None:
        return torch.ones_like(r)
    return response_mask.to(r.dtype).sum(-1).reshape(-1)
