"""BAPO (Xi et al., arXiv:2510.18927): PPO clip whose bounds [c_low, c_high] are searched on
every update so that
positive tokens carry at least a share rho0 of the policy-gradient contribution.

    J = min( w A, clip(w, c_low, c_high) A )                         (Alg. 1 line 20)
    Algorithm 1: start at (a-, a+) = (0.6, 1.2); while rho < rho0 and c_low + d2 <= b-:
        raise c_high by d1 = 0.05 up to b+ = 3.0, then c_low by d2 = 0.02 up to b- = 0.9.

The search is vectorised: the whole candidate sequence (at most 1 + 36 + 15 points with the
paper's ranges, built from integer step counts so 0.6 + 15 x 0.02 lands on 0.9) is scored in one
pass, the per-candidate sums are all-reduced once over the data-parallel group (no host sync per
step), and the first candidate meeting the target is taken — exactly what the loop would pick.

Contribution statistics (``statistic``), sums over valid tokens, rho = P / (P + N):
- ``grad`` (default, well-posed): the policy-gradient mass that survives clipping,
      P = sum_{A>0} A w [w <= c_high],  N = sum_{A<0} |A| w [w >= c_low] ([w <= c] with dual clip);
  monotone non-decreasing in both bounds, so raising either bound always helps.
- ``paper_value``: Eq. 8 literally, rho = |sum_{A>0} pi_old min(wA, clip(w, 0, c_high)A)|
      / |sum pi_old min(wA, clip(w, c_low, c_high)A)|  (raising c_low can lower it: seed notes
      §3.4).
- ``code_value``: the authors' code, P = sum_{A>=0} A min(w, c_high),
      N = sum_{A<0} |A| max(w, c_low).
``target``: ``rho`` compares P/(P+N) with rho0 (paper); ``pos_neg_ratio`` compares P/N (code).
``search_order``: ``upper_first`` (paper) or ``lower_first`` (code). Bounds are re-initialised
on every call; explicit ``c_low``/``c_high`` skip the search (for a mini-batch-global search run
beforehand with `search_bapo_bounds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megarl.errors import ConfigError
from megarl.losses.batch import LossBatch, LossTerms, RegionBounds
from megarl.losses.clipped import clipped_surrogate, dual_clip_fraction
from megarl.losses.registry import Hyper, dual_clip_c, register_policy_loss

STATISTICS = ("grad", "paper_value", "code_value")
_LOG_CAP = 1e6  # an empty denominator scores inf (target met); log it as a finite number


@dataclass(frozen=True)
class BapoBounds:
    """Outcome of one bound search."""

    c_low: float
    c_high: float
    rho_before: float  # statistic at the initial bounds (a-, a+)
    rho_after: float  # statistic at the chosen bounds
    steps: int  # search steps taken (index of the chosen candidate)
    hit_limit: bool  # no candidate met the target: the last one was taken


def _steps(lo: float, hi: float, step: float) -> int:
    return int(math.floor((hi - lo) / step + 1e-9))


def bapo_candidates(c_low_min: float, c_low_max: float, c_high_min: float, c_high_max: float,
                    step_low: float, step_high: float, search_order: str) -> Tensor:
    """The (c_low, c_high) sequence Algorithm 1 walks through, as a ``[K, 2]`` float64 tensor."""
    n_low, n_high = _steps(c_low_min, c_low_max, step_low), _steps(c_high_min, c_high_max,
                                                                   step_high)
    points: list[tuple[float, float]]
    if search_order == "upper_first":
        if n_low == 0:  # the paper's loop guard (c_low + d2 <= b-) stops it before any step
            return torch.tensor([[c_low_min, c_high_min]], dtype=torch.float64)
        points = [(c_low_min, c_high_min + k * step_high) for k in range(n_high + 1)]
        top = c_high_min + n_high * step_high
        points += [(c_low_min + j * step_low, top) for j in range(1, n_low + 1)]
    else:
        points = [(c_low_min + j * step_low, c_high_min) for j in range(n_low + 1)]
        top = c_low_min + n_low * step_low
        points += [(top, c_high_min + k * step_high) for k in range(1, n_high + 1)]
    return torch.tensor(points, dtype=torch.float64)


def bapo_contributions(ratio: Tensor, adv: Tensor, mask: Tensor, old_log_prob: Tensor,
                       candidates: Tensor, statistic: str,
                       dual_clip_c: float | None) -> tuple[Tensor, Tensor]:
    """Local per-candidate sums (positive part, total), each ``[K]``; summable across ranks."""
    valid = mask.bool()
    w = ratio.detach()[valid].double()[None, :]
    a = adv.detach()[valid].double()[None, :]
    c_low = candidates[:, :1].to(w.device)
    c_high = candidates[:, 1:].to(w.device)
    pos, neg = a > 0, a < 0
    if statistic == "grad":
        keep_neg = w >= c_low
        if dual_clip_c is not None:
            keep_neg = keep_neg & (w <= dual_clip_c)
        p = (a * w * (pos & (w <= c_high))).sum(-1)
        n = (-a * w * (neg & keep_neg)).sum(-1)
        return p, p + n
    if statistic == "code_value":
        p = (a * torch.minimum(w, c_high) * (a >= 0)).sum(-1)
        n = (-a * torch.maximum(w, c_low) * neg).sum(-1)
        return p, p + n
    pi_old = old_log_prob.detach()[valid].double().exp()[None, :]
    zero = torch.zeros_like(c_low)
    pos_part = torch.minimum(w * a, w.clamp(zero, c_high) * a) * pos
    every = torch.minimum(w * a, torch.maximum(torch.minimum(w, c_high), c_low) * a)
    return (pi_old * pos_part).sum(-1), (pi_old * every).sum(-1)


def _score(p: Tensor, total: Tensor, target: str) -> Tensor:
    """rho = P / total or P / N, with an empty denominator counting as target met."""
    p, total = p.abs(), total.abs()
    denominator = total if target == "rho" else (total - p).clamp(min=0.0)
    return torch.where(denominator > 0, p / denominator.clamp(min=1e-300),
                       torch.full_like(p, math.inf))


def search_bapo_bounds(ratio: Tensor, advantages: Tensor, mask: Tensor, old_log_prob: Tensor, *,
                       rho0: float, c_low_min: float, c_low_max: float, c_high_min: float,
                       c_high_max: float, step_low: float, step_high: float, statistic: str,
                       search_order: str, target: str, dual_clip_c: float | None,
                       process_group: Any = None) -> BapoBounds:
    """Algorithm 1's bound search on this batch (all-reduced over `process_group` if given)."""
    with torch.no_grad():
        cands = bapo_candidates(c_low_min, c_low_max, c_high_min, c_high_max, step_low,
                                step_high, search_order)
        p, total = bapo_contributions(ratio, advantages, mask, old_log_prob, cands, statistic,
                                      dual_clip_c)
        if process_group is not None and dist.is_available() and dist.is_initialized():
            sums = torch.stack([p, total])
            dist.all_reduce(sums, group=process_group)
            p, total = sums[0], sums[1]
        score = _score(p, total, target)
        met = (score >= rho0).cpu()
        hit_limit = not bool(met.any())
        k = len(cands) - 1 if hit_limit else int(torch.nonzero(met)[0])
        c_low, c_high = (float(x) for x in cands[k])
        return BapoBounds(c_low, c_high, float(score[0]), float(score[k]), k, hit_limit)


def bapo(b: LossBatch, rho0: float, c_low_min: float, c_low_max: float, c_high_min: float,
         c_high_max: float, step_low: float, step_high: float, statistic: str, search_order: str,
         target: str, dual_clip_c: float | None, c_low: float | None,
         c_high: float | None) -> LossTerms:
    """PPO clip with searched (or given) explicit ratio bounds."""
    if c_low is None or c_high is None:
        found = search_bapo_bounds(
            b.ratio, b.advantages, b.mask, b.old_log_prob, rho0=rho0, c_low_min=c_low_min,
            c_low_max=c_low_max, c_high_min=c_high_min, c_high_max=c_high_max,
            step_low=step_low, step_high=step_high, statistic=statistic,
            search_order=search_order, target=target, dual_clip_c=dual_clip_c,
            process_group=b.process_group)
        c_low, c_high = found.c_low, found.c_high
        metrics = {"bapo/rho_before": min(found.rho_before, _LOG_CAP),
                   "bapo/rho_after": min(found.rho_after, _LOG_CAP),
                   "bapo/search_steps": float(found.steps),
                   "bapo/hit_limit": float(found.hit_limit)}
    else:
        metrics = {}
    metrics.update({"bapo/c_low": c_low, "bapo/c_high": c_high})
    loss = clipped_surrogate(b.ratio, b.advantages, c_low, c_high, dual_clip_c)
    out = {k: torch.tensor(v) for k, v in metrics.items()}
    out.update(dual_clip_fraction(b, dual_clip_c))
    return LossTerms(loss, b.ratio, RegionBounds.symmetric(c_low, c_high), out)


def _check(params: dict[str, Any], field: str) -> None:
    lo_min, lo_max, hi_min, hi_max = (params[k] for k in ("c_low_min", "c_low_max", "c_high_min",
                                                         "c_high_max"))
    if lo_min > lo_max:
        raise ConfigError(f"{field}.c_low_max", lo_max, f"must be >= c_low_min = {lo_min:g}")
    if hi_min > hi_max:
        raise ConfigError(f"{field}.c_high_max", hi_max, f"must be >= c_high_min = {hi_min:g}")
    if lo_max > 1.0:
        raise ConfigError(f"{field}.c_low_max", lo_max, "must be <= 1 (a lower ratio bound)")
    if hi_min < 1.0:
        raise ConfigError(f"{field}.c_high_min", hi_min, "must be >= 1 (an upper ratio bound)")
    for key in ("c_low", "c_high"):
        if (params[key] is None) != (params["c_low" if key == "c_high" else "c_high"] is None):
            raise ConfigError(f"{field}.{key}", params[key],
                              "give both c_low and c_high (fixed bounds) or neither (search)")


def _pos(default: float, doc: str) -> Hyper:
    return Hyper(default, float, doc, low=0.0, low_open=True)


register_policy_loss(
    "bapo", default_agg="seq-mean-token-sum", check=_check,
    params=dict(
        rho0=Hyper(0.4, float, "target positive contribution", low=0.0),
        c_low_min=_pos(0.6, "a-: initial c_low"), c_low_max=_pos(0.9, "b-: c_low ceiling"),
        c_high_min=_pos(1.2, "a+: initial c_high"), c_high_max=_pos(3.0, "b+: c_high ceiling"),
        step_low=_pos(0.02, "d2: c_low step"), step_high=_pos(0.05, "d1: c_high step"),
        statistic=Hyper("grad", str, "contribution statistic", choices=STATISTICS),
        search_order=Hyper("upper_first", str, "which bound to raise first",
                           choices=("upper_first", "lower_first")),
        target=Hyper("rho", str, "rho = P/(P+N) (paper) or P/N (code)",
                     choices=("rho", "pos_neg_ratio")),
        dual_clip_c=dual_clip_c(),
        c_low=Hyper(None, float, "fixed lower bound (skips the search)", low=0.0,
                    optional=True),
        c_high=Hyper(None, float, "fixed upper bound (skips the search)", low=1.0,
                     optional=True),
    ),
    summary="BAPO (Xi et al., arXiv:2510.18927): PPO clip with [c_low, c_high] searched per "
            "update to reach rho0",
)(bapo)
