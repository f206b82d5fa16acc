"""The universal check: for every loss, autograd's gradient of the
aggregated loss w.r.t. each token's log-prob equals -A F / N, with F the paper's closed form
(tests/unit/loss_references.py, float64) — on inputs that cover all five regions."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import POLICY_LOSSES, compute_policy_loss
from tests.unit.loss_references import TOKEN_LEVEL_CASES, regions

B, T = 16, 48


def mixed_batch(seed: int = 0, dtype=torch.float32):
    """log pi_old in [-30, 0], log ratios spread over [-1.2, 1.2] (every region is hit),
    per-token advantages of both signs with ~15% exact zeros, ~10% masked padding."""
    g = torch.Generator().manual_seed(seed)
    old = -30 * torch.rand(B, T, generator=g, dtype=torch.float64)
    delta = 2.4 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1.2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[torch.rand(B, T, generator=g) < 0.15] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.1
    lp = (old + delta).to(dtype)
    return lp, old.to(dtype), adv.to(dtype), mask


def gradient(name, lp, old, adv, mask, params, agg="token-mean", **kw):
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(name, leaf, old, adv, mask, agg=agg, **kw, **params)
    loss.backward()
    return loss, leaf.grad, metrics


@pytest.mark.parametrize("case", sorted(TOKEN_LEVEL_CASES))
def test_gradient_is_minus_A_F_over_N(case):
    name, ref, ref_params, lib_params = TOKEN_LEVEL_CASES[case]
    lp, old, adv, mask = mixed_batch()
    w = torch.exp(lp.double() - old.double())
    a = adv.double()
    # the inputs really cover the five regions of the standard 0.8 / 1.2 band
    r = regions(w, a, 0.8, 1.2)
    for region in r.values():
        assert int((region & mask).sum()) >= 5
    _, grad, _ = gradient(name, lp, old, adv, mask, lib_params)
    n = mask.sum().item()
    expected = torch.where(mask, -a * ref(w, a, old_log_prob=old.double(), **ref_params) / n,
                           torch.zeros_like(w))
    torch.testing.assert_close(grad.double() * n, expected * n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(TOKEN_LEVEL_CASES))
def test_reported_weights_match_reference(case):
    """The metrics' mean F per region and zero-gradient fraction are the real ones."""
    name, ref, ref_params, lib_params = TOKEN_LEVEL_CASES[case]
    lp, old, adv, mask = mixed_batch(seed=3)
    _, _, metrics = gradient(name, lp, old, adv, mask, lib_params)
    w, a = torch.exp(lp.double() - old.double()), adv.double()
    f = ref(w, a, old_log_prob=old.double(), **ref_params)
    valid = mask & (a != 0)
    zero = (f == 0) & valid
    assert metrics["clip/frac"].item() == pytest.approx(zero.sum().item() / mask.sum().item(),
                                                        abs=1e-6)
    m_region = metrics["region/M"].item()
    assert 0 < m_region < 1


def test_every_registered_loss_has_a_gradient_check():
    token_level = {spec.name for spec in POLICY_LOSSES.values() if spec.level == "token"}
    covered = {case[0] for case in TOKEN_LEVEL_CASES.values()}
    from tests.unit.test_loss_sequence import SEQUENCE_CHECKED

    missing = token_level - covered
    assert not missing, f"token-level losses without a closed-form gradient test: {missing}"
    seq_level = {spec.name for spec in POLICY_LOSSES.values() if spec.level == "sequence"}
    assert seq_level <= set(SEQUENCE_CHECKED)


@pytest.mark.parametrize("name", ["up_grpo", "up_dapo"])
@pytest.mark.parametrize("log_w", [math.log(1e-3), 0.0, math.log(1e3)])
def test_up_positive_branch_is_reinforce_whatever_the_ratio(name, log_w):
    """UP (Fan et al.) Eq. 13: for A > 0 the gradient is exactly -A / N, for w = 1e-3, 1 or 1e3."""
    g = torch.Generator().manual_seed(1)
    old = -10 * torch.rand(4, 8, generator=g)
    lp = old + log_w
    adv = torch.rand(4, 8, generator=g) + 0.1
    mask = torch.ones(4, 8, dtype=torch.bool)
    _, grad, _ = gradient(name, lp, old, adv, mask, {})
    torch.testing.assert_close(grad, -adv / 32, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("up", "base", "params"), [
    ("up_grpo", "grpo", {}),
    ("up_dapo", "dapo", {}),
    ("up_grpo", "grpo", {"dual_clip_c": 3.0}),
    ("up_dapo", "dapo", {"dual_clip_c": 3.0, "eps_low": 0.1}),
])
def test_up_negative_branch_equals_baseline(up, base, params):
    lp, old, adv, mask = mixed_batch(seed=5)
    neg_mask = mask & (adv <= 0)
    loss_up, g_up, _ = gradient(up, lp, old, adv, neg_mask, params)
    loss_base, g_base, _ = gradient(base, lp, old, adv, neg_mask, params)
    torch.testing.assert_close(loss_up, loss_base, rtol=0, atol=0)
    torch.testing.assert_close(g_up, g_base, rtol=0, atol=0)
    # and on a full mixed batch the A <= 0 tokens still get exactly the baseline's gradient
    _, g_up, _ = gradient(up, lp, old, adv, mask, params)
    _, g_base, _ = gradient(base, lp, old, adv, mask, params)
    torch.testing.assert_close(g_up[neg_mask], g_base[neg_mask], rtol=0, atol=0)
    assert not torch.allclose(g_up[mask & (adv > 0)], g_base[mask & (adv > 0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lp_value", [-100.0, -60.0])
def test_dgpo_finite_for_tiny_old_probabilities(dtype, lp_value):
    """log pi_old = -80: C_left ~ pi_old^-(n+1) would overflow fp32; DGPO must stay finite."""
    old = torch.full((2, 4), -80.0, dtype=dtype)
    lp = torch.full((2, 4), lp_value, dtype=dtype)
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5], [-2.0, 2.0, 0.0, 1.0]], dtype=dtype)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for n, m in [(1, 2), (2, 2), (3, 1)]:
        loss, grad, metrics = gradient("dgpo", lp, old, adv, mask, {"n": n, "m": m})
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in metrics.items()
                   if not k.startswith("ratio/m"))
        w = torch.exp(torch.tensor(lp_value + 80.0, dtype=torch.float64))
        f = f_dgpo_scalar(w, adv.double(), n, m)
        rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients carry 8 bits
        torch.testing.assert_close(grad.double() * 8, -adv.double() * f, rtol=rtol, atol=1e-30)


def f_dgpo_scalar(w, a, n, m):
    from tests.unit.loss_references import f_dgpo

    return f_dgpo(torch.full_like(a, float(w)), a, 0.2, 0.2, n, m)


def test_dgpo_probability_space_weight():
    """DGPO (Fu et al., arXiv:2603.14389) Eqs. 9, 20, 23: d loss / d pi = -A W / N with
    W = C_left pi^n on LN, C_right pi^(-1/m) on HP and 1/pi_old elsewhere."""
    eps_low, eps_high, n, m = 0.2, 0.2, 1, 2
    pi_old = torch.tensor([[0.3, 0.3, 0.02, 0.02, 0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[0.5, 1.6, 0.3, 2.0, 1.0, 0.5]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, -0.5, 2.0, 1.0, 1.0]], dtype=torch.float64)
    pi = (w * pi_old).requires_grad_(True)
    loss, _ = compute_policy_loss("dgpo", torch.log(pi), torch.log(pi_old), adv,
                                  torch.ones_like(adv, dtype=torch.bool), n=n, m=m)
    loss.backward()
    p, po = pi.detach(), pi_old
    c_left = (1 - eps_low) ** (-n) * po ** (-(n + 1))
    c_right = (1 + eps_high) ** (1 / m) * po ** (1 / m - 1)
    ln = (w < 1 - eps_low) & (adv < 0)
    hp = (w > 1 + eps_high) & (adv > 0)
    weight = torch.where(ln, c_left * p**n, torch.where(hp, c_right * p ** (-1 / m), 1 / po))
    torch.testing.assert_close(pi.grad, -adv * weight / 6, rtol=1e-5, atol=0)


def test_dgpo_continuity_and_special_cases():
    lo, hi = 0.8 * (1 - 1e-7), 1.2 * (1 + 1e-7)
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[lo, hi, lo, hi]]))
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, grad, _ = gradient("dgpo", lp, old, adv, mask, {"n": 2, "m": 3})
    # just outside each boundary F equals the boundary value 1-eps_low / 1+eps_high
    torch.testing.assert_close(-grad * 4 / adv, torch.tensor([[0.8, 1.2, 0.8, 1.2]]), rtol=1e-5,
                               atol=0)
    lp_, old_, adv_, mask_ = mixed_batch(seed=9)
    _, g_dgpo, _ = gradient("dgpo", lp_, old_, adv_, mask_, {"m": 1})
    _, g_gppo, _ = gradient("gppo", lp_, old_, adv_, mask_, {})
    hp = (torch.exp(lp_ - old_) > 1.2) & (adv_ > 0) & mask_
    torch.testing.assert_close(g_dgpo[hp], g_gppo[hp])  # m = 1 is GPPO on HP
    _, g_n0, _ = gradient("dgpo", lp_, old_, adv_, mask_, {"n": 0})
    _, g_reinf, _ = gradient("cispo", lp_, old_, adv_, mask_,  # F = clip(w, 0, inf) = w
                             {"eps_low": 1.0, "eps_high": math.inf})
    ln = (torch.exp(lp_ - old_) < 0.8) & (adv_ < 0) & mask_
    torch.testing.assert_close(g_n0[ln], g_reinf[ln])  # n = 0: unclipped IS weight w on LN


def test_cispo_log_pi_form_and_ratio_form_agree():
    """CISPO's log-pi form -sg(clip w) A log pi has the gradient of the ratio form."""
    lp, old, adv, mask = mixed_batch(seed=11)
    _, g, _ = gradient("cispo", lp, old, adv, mask, {"eps_low": 0.2})
    leaf = lp.clone().requires_grad_(True)
    w = torch.exp(leaf - old)
    ratio_form = -(adv * w * (w.detach().clamp(0.8, 1.2) / w.detach()))[mask].sum() / mask.sum()
    ratio_form.backward()
    torch.testing.assert_close(g, leaf.grad, rtol=1e-6, atol=1e-9)
