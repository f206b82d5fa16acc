"""Hand-computed golden values, one case (or more) per loss, with the arithmetic written out.

The shared token-level batch: one sequence of six tokens, pi_old = 0.5 for every token,
    ratio w = (1.5, 0.5, 1.1, 0.9, 0.5, 1.5), so pi = 0.5 w = (0.75, 0.25, 0.55, 0.45, 0.25, 0.75)
    A       = ( +1,  -1,  +1,  -1,  +1,  -1)
With eps 0.2 the tokens are in regions HP, LN, M, M, LP, HN. token-mean: N = 6.
Gradient checks are d loss / d log pi = -A F / 6.
"""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import compute_policy_loss

W = [1.5, 0.5, 1.1, 0.9, 0.5, 1.5]
A = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
LN = math.log


def run(name, agg="token-mean", n=6, **params):
    old = torch.full((1, 6), LN(0.5), dtype=torch.float64)
    lp = (old + torch.log(torch.tensor([W], dtype=torch.float64))).requires_grad_(True)
    adv = torch.tensor([A], dtype=torch.float64)
    loss, metrics = compute_policy_loss(name, lp, old, adv, torch.ones(1, 6, dtype=torch.bool),
                                        agg=agg, **params)
    loss.backward()
    return loss.item(), (-lp.grad[0] * n / adv[0]).tolist(), metrics  # F per token


def check(name, value, weights, agg="token-mean", n=6, **params):
    loss, f, metrics = run(name, agg, n, **params)
    assert loss == pytest.approx(value, abs=1e-9)
    assert f == pytest.approx(weights, abs=1e-9)
    return metrics


def test_grpo():
    # -min(wA, clip(w, .8, 1.2) A): t1 -1.2 (HP clipped), t2 +0.8 (LN clipped), t3 -1.1, t4 +0.9,
    # t5 -0.5 (LP: min(0.5, 0.8)), t6 +1.5 (HN: min(-1.5, -1.2)); sum 0.4 -> 0.4 / 6
    m = check("grpo", 0.4 / 6, [0, 0, 1.1, 0.9, 0.5, 1.5])
    assert m["region/HP"].item() == pytest.approx(1 / 6)
    assert m["clip/frac"].item() == pytest.approx(2 / 6)  # t1 and t2 get no gradient


def test_grpo_dual_clip():
    # c = 1.4: t6 (A<0, w 1.5 > c) -> min(1.5, -cA = 1.4) = 1.4, gradient 0; sum 0.4 - 0.1
    m = check("grpo", 0.3 / 6, [0, 0, 1.1, 0.9, 0.5, 0], dual_clip_c=1.4)
    assert m["clip/dual_frac"].item() == pytest.approx(1 / 6)


def test_dapo():
    # clip-higher 1.28: t1 -> -1.28; sum = -1.28 + .8 - 1.1 + .9 - .5 + 1.5 = 0.32
    check("dapo", 0.32 / 6, [0, 0, 1.1, 0.9, 0.5, 1.5])


def test_dapo_eps_high_inf():
    # no upper clip: t1 -> -1.5, F = 1.5; sum = -1.5 + .8 - 1.1 + .9 - .5 + 1.5 = 0.1
    check("dapo_eps_high_inf", 0.1 / 6, [1.5, 0, 1.1, 0.9, 0.5, 1.5])


def test_dr_grpo_constant_normaliser():
    # GRPO's sum 0.4 over (1 sequence x constant length 8)
    check("dr_grpo", 0.4 / 8, [0, 0, 1.1, 0.9, 0.5, 1.5], agg="seq-mean-token-sum-norm",
          n=8, norm_length=8)


UP_VALUE = (-(LN(0.75) + LN(0.55) + LN(0.25)) + 0.8 + 0.9 + 1.5) / 6


def test_up_grpo_and_up_dapo():
    # A>0 tokens: -A log pi = -(ln .75 + ln .55 + ln .25) = 2.2718; A<0 tokens as GRPO:
    # 0.8 + 0.9 + 1.5 = 3.2; total 5.4718 / 6 = 0.91197. F: 1 on A>0, GRPO's on A<0.
    assert UP_VALUE == pytest.approx(5.471813 / 6, abs=1e-6)
    m = check("up_grpo", UP_VALUE, [1, 0, 1, 0.9, 1, 1.5])
    check("up_dapo", UP_VALUE, [1, 0, 1, 0.9, 1, 1.5])  # eps_high never binds for A <= 0
    # capacity, A>0 tokens: UP 1 - pi = (0.25 + 0.45 + 0.75)/3; clipped baseline Eq. 11 with
    # ceiling 1.2 x 0.5 = 0.6: t1 pi .75 >= .6 -> 0, t3 .6 - .55 = .05, t5 .6 - .25 = .35
    assert m["up/cap_pos"].item() == pytest.approx(1.45 / 3)
    assert m["up/cap_pos_clipped_baseline"].item() == pytest.approx(0.40 / 3)
    # A<=0 (Eq. A3, no dual clip): t2 pi .25 < .4 -> 0; t4 .45 - .4 = .05; t6 .75 - .4 = .35
    assert m["up/cap_neg"].item() == pytest.approx(0.40 / 3)


def test_reinforce_family():
    # -sum A log pi = -(ln .75 - ln .25 + ln .55 - ln .45 + ln .25 - ln .75) = -ln(.55/.45)
    check("reinforce", -LN(0.55 / 0.45) / 6, [1] * 6)
    check("up_symmetric", -LN(0.55 / 0.45) / 6, [1] * 6)


def test_w_reinforce():
    # lambda 0.1 on positives, PPO clip 0.2: positives 0.1 x (-1.2 - 1.1 - 0.5) = -0.28,
    # negatives 0.8 + 0.9 + 1.5 = 3.2 -> 2.92 / 6; F: 0.1 x (0, 1.1, 0.5) on A>0
    check("w_reinforce", 2.92 / 6, [0, 0, 0.11, 0.9, 0.05, 1.5])


def test_cispo():
    # -A sg(clip(w, .8, 1.2)) log pi: t1 -1.2 ln .75 = .345218, t2 .8 ln .25 = -1.109035,
    # t3 -1.1 ln .55 = .657621, t4 .9 ln .45 = -.718657, t5 -.8 ln .25 = 1.109035,
    # t6 1.2 ln .75 = -.345218; sum = -.061036
    value = (-1.2 * LN(0.75) + 0.8 * LN(0.25) - 1.1 * LN(0.55) + 0.9 * LN(0.45)
             - 0.8 * LN(0.25) + 1.2 * LN(0.75)) / 6
    assert value == pytest.approx(-0.061036 / 6, abs=1e-6)
    check("cispo", value, [1.2, 0.8, 1.1, 0.9, 0.8, 1.2], eps_low=0.2)
    # MiniMax default (no lower bound): t2, t5 keep w = 0.5; their terms .5 ln .25 and
    # -.5 ln .25 still cancel, so the value is unchanged
    check("cispo", value, [1.2, 0.5, 1.1, 0.9, 0.5, 1.2])


def test_gppo_and_ce_gppo():
    # value -A F. GPPO F = (1.2, 0.8, 1.1, 0.9, 0.5, 1.5): -(1.2 - .8 + 1.1 - .9 + .5 - 1.5) = 0.4
    check("gppo", 0.4 / 6, [1.2, 0.8, 1.1, 0.9, 0.5, 1.5])
    # CE-GPPO beta1 .75: LN weight .75 x .8 = .6: -(1.2 - .6 + 1.1 - .9 + .5 - 1.5) = 0.2
    check("ce_gppo", 0.2 / 6, [1.2, 0.6, 1.1, 0.9, 0.5, 1.5])


def test_dgpo():
    # n=1, m=2: LN t2 w^2 / 0.8 = .25/.8 = .3125; HP t1 sqrt(1.2) sqrt(1.5) = sqrt(1.8) = 1.341641
    # value -A F = -(1.341641 - .3125 + 1.1 - .9 + .5 - 1.5) = -0.229141
    f = [math.sqrt(1.8), 0.3125, 1.1, 0.9, 0.5, 1.5]
    value = -(math.sqrt(1.8) - 0.3125 + 1.1 - 0.9 + 0.5 - 1.5) / 6
    assert value == pytest.approx(-0.2291408 / 6, abs=1e-7)
    m = check("dgpo", value, f)
    # W pi_old = F / w: LN .3125 / .5 = .625, HP 1.341641 / 1.5 = .894427
    assert m["dgpo/weight_over_ratio_LN"].item() == pytest.approx(0.625)
    assert m["dgpo/weight_over_ratio_HP"].item() == pytest.approx(math.sqrt(1.8) / 1.5)


def test_abc_grpo():
    # -clip(w, .8, 1.2) A: -1.2 + .8 - 1.1 + .9 - .8 + 1.2 = -0.2; gradient only inside (.8, 1.2)
    m = check("abc_grpo", -0.2 / 6, [0, 0, 1.1, 0.9, 0, 0], agg="token-mean")
    assert m["abc/ppo_style_frac"].item() == pytest.approx(2 / 6)  # t1 (Q1), t2 (Q3)
    assert m["abc/overcorrection_frac"].item() == pytest.approx(2 / 6)  # t5 (Q2), t6 (Q4)


def test_sapo():
    # (4/tau) sigmoid(tau (w-1)), tau 1 (A>0) / 1.05 (A<0); F = 4 s (1-s) w
    def gate(w, tau):
        return 4 / tau / (1 + math.exp(-tau * (w - 1)))

    def weight(w, tau):
        s = 1 / (1 + math.exp(-tau * (w - 1)))
        return 4 * s * (1 - s) * w

    taus = [1.0 if a > 0 else 1.05 for a in A]
    value = -sum(a * gate(w, t) for a, w, t in zip(A, W, taus, strict=True)) / 6
    # e.g. t1: 4 sigmoid(0.5) = 4 x .622459 = 2.489837
    assert gate(1.5, 1.0) == pytest.approx(2.489837, abs=1e-6)
    check("sapo", value, [weight(w, t) for w, t in zip(W, taus, strict=True)])


def test_aspo():
    # A>0: t1 w 1.5 > 1.2 -> 0; t3 1/1.1; t5 w .5 >= 1/3 -> 1/.5 = 2.  A<0: t2 .5 < .8 -> 0;
    # t4 .9; t6 1.5 <= 3 -> 1.5. value -A F = -(0 - 0 + 1/1.1 - .9 + 2 - 1.5) = -0.509091
    check("aspo", -(1 / 1.1 - 0.9 + 2 - 1.5) / 6, [0, 0, 1 / 1.1, 0.9, 2, 1.5])


def test_dppo():
    # binary TV, delta .15, p - p_old = (.25, -.25, .05, -.05, -.25, .25):
    # t1 A>0 and +.25 > .15 -> masked; t2 A<0 and -.25 < -.15 -> masked; others keep F = w.
    # value -A F = -(0 - 0 + 1.1 - .9 + .5 - 1.5) = 0.8
    check("dppo", 0.8 / 6, [0, 0, 1.1, 0.9, 0.5, 1.5])


def test_bapo_fixed_bounds():
    # PPO clip on [0.6, 1.6]: t1 -1.5, t2 (w .5 < .6, A<0) +.6 clipped, t3 -1.1, t4 .9, t5 -.5,
    # t6 1.5: sum -0.1
    check("bapo", -0.1 / 6, [1.5, 0, 1.1, 0.9, 0.5, 1.5], c_low=0.6, c_high=1.6)


def test_bapo_search():
    # grad statistic at (0.6, 1.22): P = 1.1 + 0.5 = 1.6 (t1 w 1.5 > 1.22 excluded),
    # N = .9 + 1.5 = 2.4 (t2 w .5 < .6 excluded) -> rho = 1.6 / 4.0 = 0.4 < 0.5.
    # Raising c_high by .05: 1.27, ..., 1.47 still exclude t1; 1.52 (6 steps) admits it:
    # P = 3.1, rho = 3.1 / 5.5 = 0.5636 >= 0.5 -> bounds (0.6, 1.52).
    m = check("bapo", (-1.5 + 0.6 - 1.1 + 0.9 - 0.5 + 1.5) / 6, [1.5, 0, 1.1, 0.9, 0.5, 1.5],
              rho0=0.5, c_high_min=1.22)
    assert m["bapo/c_high"].item() == pytest.approx(1.52)
    assert m["bapo/c_low"].item() == pytest.approx(0.6)
    assert m["bapo/search_steps"].item() == 6
    assert m["bapo/rho_before"].item() == pytest.approx(0.4)
    assert m["bapo/rho_after"].item() == pytest.approx(3.1 / 5.5)


def seq_batch():
    """Three sequences of two tokens, pi_old = 0.5; log-ratios (0.1, -0.1), (0.25, 0.35),
    (0.3, 0.3); A = (+1, -1, +1). Sequence ratios s = (1, e^0.3, e^0.3) = (1, 1.349859, ...)."""
    old = torch.full((3, 2), LN(0.5), dtype=torch.float64)
    delta = torch.tensor([[0.1, -0.1], [0.25, 0.35], [0.3, 0.3]], dtype=torch.float64)
    return old + delta, old, torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)


def run_seq(name, **params):
    lp, old, adv = seq_batch()
    lp.requires_grad_(True)
    loss, _ = compute_policy_loss(name, lp, old, adv, torch.ones(3, 2, dtype=torch.bool),
                                  agg="seq-mean-token-mean", **params)
    loss.backward()
    return loss.item(), lp.grad


def test_gspo():
    # seq 1: s = 1 inside [1-3e-4, 1+4e-4]: -sA = -1.  seq 2: A<0, s = e^.3 = 1.349859 > 1+eps:
    # min(sA, clip(s)A) = -1.349859 (unclipped) -> +1.349859.  seq 3: A>0, s > 1+4e-4: clipped to
    # -(1.0004). loss = (-1 + 1.349859 - 1.0004) / 3 = -0.216847.
    # gradients per token: -A s / (G |o|): seq1 -1/6, seq2 +1.349859/6, seq3 0.
    loss, grad = run_seq("gspo")
    assert loss == pytest.approx((-1 + math.exp(0.3) - 1.0004) / 3, abs=1e-9)
    expected = torch.tensor([[-1 / 6] * 2, [math.exp(0.3) / 6] * 2, [0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_up_gspo():
    # A>0 sequences: -A mean_t log pi: seq1 -(ln .5) = .693147; seq3 -(ln .5 + .3) = .393147.
    # seq2 as GSPO: 1.349859. loss = (.693147 + 1.349859 + .393147) / 3 = 0.812051.
    # gradients: A>0 -> -A / (G |o|) = -1/6 per token; seq2 +1.349859/6.
    loss, grad = run_seq("up_gspo")
    assert loss == pytest.approx((-LN(0.5) + math.exp(0.3) - (LN(0.5) + 0.3)) / 3, abs=1e-9)
    assert loss == pytest.approx(0.812051, abs=1e-6)
    expected = torch.tensor([[-1 / 6] * 2, [math.exp(0.3) / 6] * 2, [-1 / 6] * 2],
                            dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_gmpo():
    # eps 0.4 in log space, no token clipped here: s~ = (1, e^.3, e^.3).
    # loss = (-1 + e^.3 - e^.3) / 3 = -1/3; gradients -A s~ / (G |o|).
    loss, grad = run_seq("gmpo")
    assert loss == pytest.approx(-1 / 3, abs=1e-9)
    expected = torch.tensor([[-1 / 6] * 2, [math.exp(0.3) / 6] * 2, [-math.exp(0.3) / 6] * 2],
                            dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_kl_beta_term():
    # pi_ref = 2 pi on every token: x = ln 2, k3 = 2 - ln 2 - 1 = 0.306853; beta .1 adds .0306853
    lp = torch.full((1, 6), LN(0.25), dtype=torch.float64)
    ref = lp + LN(2.0)
    adv = torch.zeros(1, 6, dtype=torch.float64)
    loss, m = compute_policy_loss("grpo", lp, lp, adv, torch.ones(1, 6), ref_log_prob=ref,
                                  beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (1 - LN(2.0)), abs=1e-12)
    assert m["kl/ref_mean"].item() == pytest.approx(1 - LN(2.0))
    loss_k1, _ = compute_policy_loss("grpo", lp, lp, adv, torch.ones(1, 6), ref_log_prob=ref,
                                     beta=0.1, kl_type="k1")
    assert loss_k1.item() == pytest.approx(-0.1 * LN(2.0))  # k1 = -x
    loss_k2, _ = compute_policy_loss("grpo", lp, lp, adv, torch.ones(1, 6), ref_log_prob=ref,
                                     beta=0.1, kl_type="k2")
    assert loss_k2.item() == pytest.approx(0.1 * LN(2.0) ** 2 / 2)
