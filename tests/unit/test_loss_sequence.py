"""Sequence-level losses (GSPO, UP-GSPO, GMPO) against their closed-form gradients."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import compute_policy_loss

SEQUENCE_CHECKED = ("gspo", "up_gspo", "gmpo")
B, T = 14, 20


def sequence_batch(seed: int = 0):
    """Per-sequence mean log-ratios on both sides of GSPO's tiny band (3e-4 / 4e-4) and of
    GMPO's 0.4, variable lengths, per-sequence advantages of both signs and zero."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    means = torch.tensor([-0.05, -1e-3, -1e-4, 0.0, 1e-4, 1e-3, 0.05] * 2, dtype=torch.float64)
    noise = 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    noise = noise - (noise.sum(-1, keepdim=True) / lengths[:, None]) * mask  # zero-mean per seq
    old = -20 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = old + means[:, None] + noise
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0] * 2, dtype=torch.float64)
    return lp.float(), old.float(), adv.float(), mask


def grad_of(name, lp, old, adv, mask, agg, **params):
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(name, leaf, old, adv, mask, agg=agg, **params)
    loss.backward()
    return loss, leaf.grad.double(), metrics


def per_token_scale(mask, agg):
    """d loss / d (per-token loss) for each aggregation mode."""
    lengths = mask.sum(-1, keepdim=True).double()
    n_seq = mask.any(-1).sum().item()
    if agg == "seq-mean-token-mean":
        return mask / (n_seq * lengths)
    return mask / mask.sum().item()  # token-mean


def gspo_weight(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4):
    delta = (lp.double() - old.double()) * mask
    s = torch.exp(delta.sum(-1) / mask.sum(-1))
    a = adv.double()
    clipped = ((a > 0) & (s > 1 + eps_high)) | ((a < 0) & (s < 1 - eps_low))
    return torch.where(clipped, torch.zeros_like(s), s)[:, None].expand(-1, T)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_closed_form(agg):
    lp, old, adv, mask = sequence_batch()
    _, grad, _ = grad_of("gspo", lp, old, adv, mask, agg)
    f = gspo_weight(lp, old, adv, mask)
    expected = -adv.double()[:, None] * f * per_token_scale(mask, agg)
    # both branches occur: some sequences clipped, some not
    assert (f[:, 0] == 0).any() and ((f[:, 0] > 0) & (adv != 0)).any()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_up_gspo_closed_form(agg):
    """Eq. A6: for A > 0 the length-normalised REINFORCE gradient; GSPO for A <= 0."""
    lp, old, adv, mask = sequence_batch(seed=1)
    _, grad, _ = grad_of("up_gspo", lp, old, adv, mask, agg)
    a = adv.double()[:, None]
    f = torch.where(a > 0, torch.ones(B, T, dtype=torch.float64), gspo_weight(lp, old, adv, mask))
    expected = -a * f * per_token_scale(mask, agg)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)
    # the negative branch is GSPO's exactly
    _, g_gspo, _ = grad_of("gspo", lp, old, adv, mask, agg)
    neg = (adv <= 0)[:, None] & mask
    torch.testing.assert_close(grad[neg], g_gspo[neg], rtol=0, atol=0)


@pytest.mark.parametrize("log_w", [math.log(1e-3), math.log(1e3)])
def test_up_gspo_positive_branch_ignores_ratio(log_w):
    lp, old, _, mask = sequence_batch(seed=2)
    adv = torch.rand(B) + 0.1
    _, grad, _ = grad_of("up_gspo", old + log_w, old, adv, mask, "seq-mean-token-mean")
    expected = -adv.double()[:, None] * per_token_scale(mask, "seq-mean-token-mean")
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gmpo_closed_form(agg):
    """d L / d log pi_it = -A_i s~_i [token unclipped] x the aggregation weight."""
    lp, old, adv, mask = sequence_batch(seed=4)
    eps = 0.4
    delta = lp.double() - old.double()
    a = adv.double()[:, None]
    bounded = delta.clamp(-eps, eps)
    d = torch.where(a > 0, torch.minimum(delta, bounded), torch.maximum(delta, bounded)) * mask
    s = torch.exp(d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
    unclipped = ~(((a > 0) & (delta > eps)) | ((a < 0) & (delta < -eps)))
    expected = -a * s * unclipped * per_token_scale(mask, agg)
    _, grad, _ = grad_of("gmpo", lp, old, adv, mask, agg)
    assert (~unclipped & mask & (a != 0)).any() and (unclipped & mask & (a != 0)).any()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_gmpo_value_is_geometric_mean_of_clipped_ratios():
    # one sequence, A = 1, ratios (1.2, 0.5, 2.0): log-space clip at 0.4 caps 2.0 at e^0.4 and
    # leaves 0.5 (the lower side is not clipped for A > 0): J = (1.2 * 0.5 * e^0.4)^(1/3)
    w = torch.tensor([[1.2, 0.5, 2.0]])
    loss, _ = compute_policy_loss("gmpo", torch.log(w), torch.zeros(1, 3), torch.tensor([1.0]),
                                  torch.ones(1, 3), agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-((1.2 * 0.5 * math.exp(0.4)) ** (1 / 3)), rel=1e-6)
