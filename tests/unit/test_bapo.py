"""BAPO's bound search (Xi et al., arXiv:2510.18927, Algorithm 1) against a plain-Python
reference loop."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarl.losses import compute_policy_loss, validate_loss_params
from megarl.losses.bapo import bapo_candidates, search_bapo_bounds

PAPER = dict(rho0=0.4, c_low_min=0.6, c_low_max=0.9, c_high_min=1.2, c_high_max=3.0,
             step_low=0.02, step_high=0.05)


def data(seed, n=400, pos_frac=0.3, sigma=0.4):
    g = torch.Generator().manual_seed(seed)
    log_w = sigma * torch.randn(1, n, generator=g, dtype=torch.float64)
    adv = torch.where(torch.rand(1, n, generator=g) < pos_frac, 1.0, -1.0).double()
    adv = adv * torch.rand(1, n, generator=g, dtype=torch.float64)
    old = -5 * torch.rand(1, n, generator=g, dtype=torch.float64)
    return torch.exp(log_w), adv, torch.ones(1, n, dtype=torch.bool), old


def reference_statistic(w, a, old, c_low, c_high, statistic, target, dual):
    """Python sums over tokens, written from the formulas of the module docstring."""
    w, a, pi_old = w.flatten().tolist(), a.flatten().tolist(), old.exp().flatten().tolist()
    if statistic == "grad":
        p = sum(ai * wi for wi, ai in zip(w, a, strict=True) if ai > 0 and wi <= c_high)
        n = sum(-ai * wi for wi, ai in zip(w, a, strict=True)
                if ai < 0 and wi >= c_low and (dual is None or wi <= dual))
        total = p + n
    elif statistic == "code_value":
        p = sum(ai * min(wi, c_high) for wi, ai in zip(w, a, strict=True) if ai >= 0)
        n = sum(-ai * max(wi, c_low) for wi, ai in zip(w, a, strict=True) if ai < 0)
        total = p + n
    else:  # Eq. 8 literally
        p = abs(sum(po * min(wi * ai, min(wi, c_high) * ai)
                    for wi, ai, po in zip(w, a, pi_old, strict=True) if ai > 0))
        total = abs(sum(po * min(wi * ai, min(max(wi, c_low), c_high) * ai)
                        for wi, ai, po in zip(w, a, pi_old, strict=True)))
    denom = total if target == "rho" else total - p
    return float("inf") if denom <= 0 else p / denom


def reference_search(w, a, old, p, statistic, order, target, dual=None):
    """Algorithm 1 as a loop, with integer step counters."""
    i_low = i_high = 0
    n_low = round((p["c_low_max"] - p["c_low_min"]) / p["step_low"])
    n_high = round((p["c_high_max"] - p["c_high_min"]) / p["step_high"])

    def bounds():
        return (p["c_low_min"] + i_low * p["step_low"], p["c_high_min"] + i_high * p["step_high"])

    rho = reference_statistic(w, a, old, *bounds(), statistic, target, dual)
    steps = 0
    if order == "upper_first":
        while rho < p["rho0"] and i_low + 1 <= n_low:
            if i_high + 1 <= n_high:
                i_high += 1
            else:
                i_low += 1
            steps += 1
            rho = reference_statistic(w, a, old, *bounds(), statistic, target, dual)
    else:
        while rho < p["rho0"] and (i_low < n_low or i_high < n_high):
            if i_low < n_low:
                i_low += 1
            else:
                i_high += 1
            steps += 1
            rho = reference_statistic(w, a, old, *bounds(), statistic, target, dual)
    return (*bounds(), steps)


@pytest.mark.parametrize("statistic", ["grad", "code_value", "paper_value"])
@pytest.mark.parametrize("order", ["upper_first", "lower_first"])
@pytest.mark.parametrize("target", ["rho", "pos_neg_ratio"])
@pytest.mark.parametrize("seed", range(4))
def test_vectorised_search_equals_reference_loop(statistic, order, target, seed):
    w, a, mask, old = data(seed, pos_frac=[0.15, 0.3, 0.45, 0.6][seed])
    params = dict(PAPER, rho0=0.4 if target == "rho" else 0.6)
    dual = 3.0 if seed == 1 else None
    found = search_bapo_bounds(w, a, mask, old, statistic=statistic, search_order=order,
                               target=target, dual_clip_c=dual, **params)
    c_low, c_high, steps = reference_search(w, a, old, params, statistic, order, target, dual)
    assert (found.c_low, found.c_high, found.steps) == (pytest.approx(c_low),
                                                        pytest.approx(c_high), steps)
    assert PAPER["c_low_min"] <= found.c_low <= PAPER["c_low_max"] + 1e-12
    assert PAPER["c_high_min"] <= found.c_high <= PAPER["c_high_max"] + 1e-12


def test_candidate_grid_uses_integer_steps():
    cands = bapo_candidates(0.6, 0.9, 1.2, 3.0, 0.02, 0.05, "upper_first")
    assert len(cands) == 1 + 36 + 15
    assert cands[36].tolist() == pytest.approx([0.6, 3.0])
    assert cands[-1].tolist() == pytest.approx([0.9, 3.0])  # 0.6 + 15 x 0.02 reaches 0.9
    assert len(bapo_candidates(0.6, 0.9, 1.2, 3.0, 0.02, 0.05, "lower_first")) == 52


def test_grad_statistic_is_monotone_in_both_bounds():
    from megarl.losses.bapo import bapo_contributions

    w, a, mask, old = data(7)
    lows = torch.linspace(0.6, 0.9, 16, dtype=torch.float64)
    highs = torch.linspace(1.2, 3.0, 37, dtype=torch.float64)
    grid = torch.cartesian_prod(lows, highs)
    p, total = bapo_contributions(w, a, mask, old, grid, "grad", None)
    rho = (p / total).reshape(16, 37)
    assert (rho.diff(dim=0) >= -1e-12).all() and (rho.diff(dim=1) >= -1e-12).all()


def test_loss_equals_ppo_clip_with_the_chosen_bounds():
    w, a, mask, old = data(1, pos_frac=0.4)
    lp = (old + torch.log(w)).requires_grad_(True)
    loss, m = compute_policy_loss("bapo", lp, old, a, mask, dual_clip_c=3.0)
    loss.backward()
    lp2 = (old + torch.log(w)).requires_grad_(True)
    c_low, c_high = m["bapo/c_low"].item(), m["bapo/c_high"].item()
    ref, _ = compute_policy_loss("grpo", lp2, old, a, mask, eps_low=1 - c_low,
                                 eps_high=c_high - 1, dual_clip_c=3.0)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lp.grad, lp2.grad)
    assert m["bapo/rho_after"].item() >= 0.4 > m["bapo/rho_before"].item()


def test_on_policy_runs_to_the_maxima_and_is_plain_policy_gradient():
    _, a, mask, old = data(4, pos_frac=0.2)
    lp = old.clone().requires_grad_(True)  # w == 1: bounds cannot change rho (= P share)
    loss, m = compute_policy_loss("bapo", lp, old, a, mask)
    loss.backward()
    assert m["bapo/hit_limit"].item() == 1.0
    assert (m["bapo/c_low"].item(), m["bapo/c_high"].item()) == pytest.approx((0.9, 3.0))
    torch.testing.assert_close(lp.grad, -a / mask.sum())
    # bounds are re-initialised on every call: a second call searches from scratch
    _, m2 = compute_policy_loss("bapo", old.clone(), old, a, mask)
    assert m2["bapo/search_steps"].item() == m["bapo/search_steps"].item() == 51


def _dp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w, a, mask, old = data(1, n=600, pos_frac=0.4)
    shard = slice(rank * 300, (rank + 1) * 300)
    found = search_bapo_bounds(w[:, shard], a[:, shard], mask[:, shard], old[:, shard],
                               statistic="grad", search_order="upper_first", target="rho",
                               dual_clip_c=None, process_group=dist.group.WORLD, **PAPER)
    results[rank] = (found.c_low, found.c_high, found.steps, found.rho_after)
    dist.destroy_process_group()


def test_data_parallel_search_equals_unsharded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_dp_worker, args=(2, port, results), nprocs=2, join=True)
    w, a, mask, old = data(1, n=600, pos_frac=0.4)
    whole = search_bapo_bounds(w, a, mask, old, statistic="grad", search_order="upper_first",
                               target="rho", dual_clip_c=None, **PAPER)
    for rank in range(2):
        assert results[rank] == pytest.approx((whole.c_low, whole.c_high, whole.steps,
                                               whole.rho_after))
    # a shard alone would choose differently: the all-reduce matters
    alone = search_bapo_bounds(w[:, :300], a[:, :300], mask[:, :300], old[:, :300],
                               statistic="grad", search_order="upper_first", target="rho",
                               dual_clip_c=None, **PAPER)
    assert alone.steps != whole.steps


def test_bapo_config_checks():
    from megarl.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.params.c_low_max"):
        validate_loss_params("bapo", {"c_low_min": 0.8, "c_low_max": 0.7})
    with pytest.raises(ConfigError, match="give both c_low and c_high"):
        validate_loss_params("bapo", {"c_low": 0.7})
    with pytest.raises(ConfigError, match="statistic"):
        validate_loss_params("bapo", {"statistic": "value"})
