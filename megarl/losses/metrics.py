"""Metrics every policy loss reports, token-weighted over the response mask.

The gradient weight F is MEASURED, not re-derived: g = d(sum of the per-token loss)/d log pi is
taken by autograd on the loss's own graph (a few elementwise ops; the model is not touched), and
F = -g / A on tokens with A != 0. The reported weights are therefore the ones the optimizer gets.

Names (kinds for cross-rank reduction follow megarl.metrics: ``/min`` min, ``/max`` max,
``count/`` sum, the rest token-weighted means):
- ``region/{LN,HP,LP,HN,M}``       fraction of tokens per region (the loss's own thresholds)
- ``grad_weight/{region}``         mean F per region (tokens with A != 0)
- ``clip/frac``                    tokens with A != 0 whose gradient is zero (hard-clipped)
- ``clip/zero_grad_frac``          all tokens with zero gradient (A = 0 included)
- ``ratio/mean|min|max``           the token ratio w; ``seq_ratio/*`` for sequence-level losses
- ``kl/old_k1``, ``kl/old_k3``     approx KL(pi_old || pi) from the sampled tokens
- ``entropy/mean``                 when the caller passes per-token entropy
- ``count/tokens``, ``count/sequences``
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.losses.batch import LossBatch, RegionBounds, conditional_mean, masked_mean

REGIONS: tuple[str, ...] = ("LN", "HP", "LP", "HN", "M")


def region_masks(ratio: Tensor, advantages: Tensor, mask: Tensor,
                 bounds: RegionBounds) -> dict[str, Tensor]:
    """Boolean masks of the five regions (strict inequalities; A = 0 is always M)."""
    w = ratio.detach()
    pos, neg = (advantages > 0) & mask, (advantages < 0) & mask
    out = {
        "LN": neg & (w < bounds.low_neg),
        "HP": pos & (w > bounds.high_pos),
        "LP": pos & (w < bounds.low_pos),
        "HN": neg & (w > bounds.high_neg),
    }
    out["M"] = mask & ~(out["LN"] | out["HP"] | out["LP"] | out["HN"])
    return out


def loss_metrics(b: LossBatch, ratio: Tensor, bounds: RegionBounds, grad: Tensor | None,
                 sequence_ratio: Tensor | None = None,
                 entropy: Tensor | None = None) -> dict[str, Tensor]:
    """The common metrics; `grad` is d(sum loss)/d log pi per token (None: not measured)."""
    with torch.no_grad():
        mask = b.mask
        n_tokens = mask.sum()
        metrics: dict[str, Tensor] = {
            "count/tokens": n_tokens.float(),
            "count/sequences": mask.any(-1).sum().float(),
        }
        regions = region_masks(ratio, b.advantages, mask, bounds)
        nonzero_adv = mask & (b.advantages != 0)
        for name, region in regions.items():
            metrics[f"region/{name}"] = masked_mean(region, mask)
        if grad is not None:
            safe_adv = torch.where(nonzero_adv, b.advantages, torch.ones_like(b.advantages))
            weight = -grad / safe_adv
            zero = (grad == 0) & mask
            for name, region in regions.items():
                metrics |= conditional_mean(f"grad_weight/{name}", weight, region & nonzero_adv)
            metrics["clip/frac"] = masked_mean(zero & nonzero_adv, mask)
            metrics["clip/zero_grad_frac"] = masked_mean(zero, mask)
        w = b.ratio.detach()
        metrics.update(_ratio_stats("ratio", w, mask))
        if sequence_ratio is not None:
            metrics.update(_ratio_stats("seq_ratio", sequence_ratio.detach(), mask))
        log_ratio = b.log_ratio.detach()
        metrics["kl/old_k1"] = masked_mean(-log_ratio, mask)
        metrics["kl/old_k3"] = masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)
        if entropy is not None:
            metrics["entropy/mean"] = masked_mean(entropy.detach().float(), mask)
        return metrics


def _ratio_stats(prefix: str, w: Tensor, mask: Tensor) -> dict[str, Tensor]:
    if not bool(mask.any()):
        # Neutral elements, so an empty micro-batch never wins a cross-rank min / max.
        def full(v: float) -> Tensor:
            return torch.full((), v, dtype=w.dtype, device=w.device)

        return {f"{prefix}/mean": full(0.0), f"{prefix}/min": full(float("inf")),
                f"{prefix}/max": full(float("-inf"))}
    valid = w[mask]
    return {f"{prefix}/mean": valid.mean(), f"{prefix}/min": valid.min(),
            f"{prefix}/max": valid.max()}
