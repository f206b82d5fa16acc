"""Independent closed-form gradient weights F for the token-level losses, written from the
papers' equations in float64 — never from megarl's code.

F(w, A) is the log-prob gradient weight: d(per-token loss)/d log pi = -A F.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def regions(w: Tensor, a: Tensor, lo: float, hi: float) -> dict[str, Tensor]:
    return {
        "LN": (w < lo) & (a < 0),
        "HP": (w > hi) & (a > 0),
        "LP": (w < lo) & (a > 0),
        "HN": (w > hi) & (a < 0),
    }


def f_ppo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, dual_clip_c=None, **_) -> Tensor:
    r = regions(w, a, 1 - eps_low, 1 + eps_high)
    zero = r["LN"] | r["HP"]
    if dual_clip_c is not None:
        zero = zero | ((a < 0) & (w > dual_clip_c))
    return torch.where(zero, torch.zeros_like(w), w)


def f_up(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, dual_clip_c=None, **_) -> Tensor:
    return torch.where(a > 0, torch.ones_like(w), f_ppo(w, a, eps_low, eps_high, dual_clip_c))


def f_cispo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, **_) -> Tensor:
    return w.clamp(1 - eps_low, 1 + eps_high)


def f_ce_gppo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, beta1=0.75, beta2=1.0,
              **_) -> Tensor:
    r = regions(w, a, 1 - eps_low, 1 + eps_high)
    f = torch.where(r["LN"], torch.full_like(w, beta1 * (1 - eps_low)), w)
    return torch.where(r["HP"], torch.full_like(w, beta2 * (1 + eps_high)), f)


def f_gppo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, beta1=1.0, beta2=1.0, **_) -> Tensor:
    return f_ce_gppo(w, a, eps_low, eps_high, beta1, beta2)


def f_dgpo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, n=1, m=2, **_) -> Tensor:
    r = regions(w, a, 1 - eps_low, 1 + eps_high)
    f = torch.where(r["LN"], w ** (n + 1) / (1 - eps_low) ** n, w)
    return torch.where(r["HP"], (1 + eps_high) ** (1 / m) * w ** (1 - 1 / m), f)


def f_abc(w: Tensor, a: Tensor, eps1=0.2, eps2=0.2, eps3=0.2, eps4=0.2, **_) -> Tensor:
    lo = torch.where(a > 0, torch.full_like(w, 1 - eps2), torch.full_like(w, 1 - eps4))
    hi = torch.where(a > 0, torch.full_like(w, 1 + eps1), torch.full_like(w, 1 + eps3))
    inside = (w > lo) & (w < hi)
    return torch.where(inside, w, torch.zeros_like(w))


def f_reinforce(w: Tensor, a: Tensor, **_) -> Tensor:
    return torch.ones_like(w)


def f_w_reinforce(w: Tensor, a: Tensor, lam=0.1, eps_low=0.2, eps_high=0.2, **_) -> Tensor:
    f = f_ppo(w, a, eps_low, eps_high)
    return torch.where(a > 0, lam * f, f)


def f_aspo(w: Tensor, a: Tensor, eps_low=0.2, eps_high=0.2, c=3.0, **_) -> Tensor:
    """Official Archer2.0 code (research note §1.3)."""
    pos = torch.where(w > 1 + eps_high, torch.zeros_like(w),
                      torch.where(w < 1 / c, torch.full_like(w, c), 1 / w))
    neg = torch.where(w < 1 - eps_low, torch.zeros_like(w),
                      torch.where(w > c, torch.full_like(w, c), w))
    return torch.where(a > 0, pos, neg)


def f_dppo_tv(w: Tensor, a: Tensor, delta=0.15, old_log_prob=None, **_) -> Tensor:
    p_old = torch.exp(old_log_prob)
    p = w * p_old
    out = torch.where(a > 0, (p - p_old) > delta, (p - p_old) < -delta)
    return torch.where(out, torch.zeros_like(w), w)


def f_dppo_kl(w: Tensor, a: Tensor, delta=0.05, cap=None, old_log_prob=None, **_) -> Tensor:
    p_old = torch.exp(old_log_prob)
    p = w * p_old
    kl = p_old * torch.log(p_old / p) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
    out = torch.where(a > 0, (kl > delta) & (p > p_old), (kl > delta) & (p < p_old))
    f = w if cap is None else w.clamp(max=cap)
    return torch.where(out, torch.zeros_like(w), f)


def f_bapo_fixed(w: Tensor, a: Tensor, c_low=0.7, c_high=1.5, dual_clip_c=None, **_) -> Tensor:
    return f_ppo(w, a, 1 - c_low, c_high - 1, dual_clip_c)


def f_sapo(w: Tensor, a: Tensor, tau_pos=1.0, tau_neg=1.05, **_) -> Tensor:
    tau = torch.where(a > 0, torch.full_like(w, tau_pos), torch.full_like(w, tau_neg))
    s = torch.sigmoid(tau * (w - 1))
    return 4 * s * (1 - s) * w


# loss name -> (reference F, the reference's parameters = the paper's values, what megarl is
# given). An empty last dict means megarl's DEFAULTS must equal the paper's values.
TOKEN_LEVEL_CASES: dict[str, tuple] = {
    "grpo": ("grpo", f_ppo, {"eps_low": 0.2, "eps_high": 0.2}, {}),
    "grpo+dual_clip": ("grpo", f_ppo, {"dual_clip_c": 3.0}, {"dual_clip_c": 3.0}),
    "dapo": ("dapo", f_ppo, {"eps_low": 0.2, "eps_high": 0.28}, {}),
    "dapo_eps_high_inf": ("dapo_eps_high_inf", f_ppo, {"eps_high": math.inf}, {}),
    "dapo+inf": ("dapo", f_ppo, {"eps_high": math.inf}, {"eps_high": math.inf}),
    "dr_grpo": ("dr_grpo", f_ppo, {}, {}),
    "up_grpo": ("up_grpo", f_up, {"eps_low": 0.2}, {}),
    "up_grpo+dual_clip": ("up_grpo", f_up, {"dual_clip_c": 2.0}, {"dual_clip_c": 2.0}),
    "up_dapo": ("up_dapo", f_up, {"eps_low": 0.2}, {}),
    "cispo": ("cispo", f_cispo, {"eps_low": 1.0, "eps_high": 0.2}, {}),
    "cispo+dgpo_setting": ("cispo", f_cispo, {"eps_low": 0.2}, {"eps_low": 0.2}),
    "sapo": ("sapo", f_sapo, {"tau_pos": 1.0, "tau_neg": 1.05}, {}),
    "sapo+tau": ("sapo", f_sapo, {"tau_pos": 2.0, "tau_neg": 4.0},
                 {"tau_pos": 2.0, "tau_neg": 4.0}),
    "aspo": ("aspo", f_aspo, {"eps_low": 0.2, "eps_high": 0.2, "c": 3.0}, {}),
    "aspo+c2": ("aspo", f_aspo, {"eps_low": 0.1, "c": 2.0}, {"eps_low": 0.1, "dual_clip_c": 2.0}),
    "dppo": ("dppo", f_dppo_tv, {"delta": 0.15}, {}),
    "dppo+kl": ("dppo", f_dppo_kl, {"delta": 0.05, "cap": 2.0},
                {"variant": "binary_kl", "delta_low": 0.05, "delta_high": 0.05,
                 "ratio_cap": 2.0}),
    "gppo": ("gppo", f_gppo, {"eps_low": 0.2, "eps_high": 0.2}, {}),
    "ce_gppo": ("ce_gppo", f_ce_gppo, {"beta1": 0.75, "beta2": 1.0}, {}),
    "dgpo": ("dgpo", f_dgpo, {"n": 1, "m": 2}, {}),
    "dgpo+n2m2": ("dgpo", f_dgpo, {"n": 2, "m": 2}, {"n": 2, "m": 2}),
    "dgpo+n3m1": ("dgpo", f_dgpo, {"n": 3, "m": 1, "eps_high": 0.28},
                  {"n": 3, "m": 1, "eps_high": 0.28}),
    "abc_grpo": ("abc_grpo", f_abc, {"eps1": 0.2, "eps2": 0.2, "eps3": 0.2, "eps4": 0.2}, {}),
    "abc_grpo+asym": ("abc_grpo", f_abc, {"eps1": 0.3, "eps2": 0.1, "eps3": 0.5, "eps4": 0.25},
                      {"eps1": 0.3, "eps2": 0.1, "eps3": 0.5, "eps4": 0.25}),
    "reinforce": ("reinforce", f_reinforce, {}, {}),
    "up_symmetric": ("up_symmetric", f_reinforce, {}, {}),
    "w_reinforce": ("w_reinforce", f_w_reinforce, {"lam": 0.1}, {}),
    "w_reinforce+lam": ("w_reinforce", f_w_reinforce, {"lam": 0.5, "eps_high": 0.28},
                        {"lam": 0.5, "eps_high": 0.28}),
    "bapo+fixed": ("bapo", f_bapo_fixed, {"c_low": 0.7, "c_high": 1.5},
                   {"c_low": 0.7, "c_high": 1.5}),
    "bapo+fixed+dual": ("bapo", f_bapo_fixed, {"c_low": 0.7, "c_high": 1.5, "dual_clip_c": 2.5},
                        {"c_low": 0.7, "c_high": 1.5, "dual_clip_c": 2.5}),
}
