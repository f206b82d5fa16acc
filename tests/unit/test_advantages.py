"""Advantage estimators against brute-force loops, and the dynamic-sampling filter."""

from __future__ import annotations

import statistics

import pytest
import torch

from megarl.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, dynamic_sampling_mask
from megarl.errors import ConfigError

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 0.0, 1.0]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 9, 9, 9, 5]  # sizes 4, 3, 3 and a singleton


def by_group():
    out: dict[int, list[int]] = {}
    for i, g in enumerate(GROUPS):
        out.setdefault(g, []).append(i)
    return out


def run(name, **kw):
    return compute_advantages(name, torch.tensor(REWARDS, dtype=torch.float64),
                              torch.tensor(GROUPS), **kw).tolist()


def test_grpo_dr_grpo_rloo_brute_force():
    grpo, dr, rloo = run("grpo"), run("dr_grpo"), run("rloo")
    for members in by_group().values():
        rs = [REWARDS[i] for i in members]
        mean = sum(rs) / len(rs)
        for i in members:
            assert dr[i] == pytest.approx(REWARDS[i] - mean)
            if len(members) == 1:
                assert grpo[i] == 0 and rloo[i] == 0
                continue
            std = statistics.stdev(rs)
            assert grpo[i] == pytest.approx((REWARDS[i] - mean) / (std + 1e-6))
            others = [REWARDS[j] for j in members if j != i]
            assert rloo[i] == pytest.approx(REWARDS[i] - sum(others) / len(others))


def test_group_size_equals_explicit_ids():
    r = torch.rand(12, dtype=torch.float64)
    a = compute_advantages("grpo", r, group_size=4)
    b = compute_advantages("grpo", r, torch.arange(12) // 4)
    torch.testing.assert_close(a, b)


def test_reinforce_pp_global_whitening():
    adv = run("reinforce_pp")
    mean, std = statistics.mean(REWARDS), statistics.stdev(REWARDS)
    assert adv == pytest.approx([(r - mean) / (std + 1e-6) for r in REWARDS])
    # token-weighted: a response of L tokens counts L times (reference: whiten token returns)
    lengths = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]
    mask = torch.zeros(len(REWARDS), 3)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    tokens = [r for r, n in zip(REWARDS, lengths, strict=True) for _ in range(n)]
    mean_t, std_t = statistics.mean(tokens), statistics.stdev(tokens)
    adv_t = run("reinforce_pp", response_mask=mask)
    assert adv_t == pytest.approx([(r - mean_t) / (std_t + 1e-6) for r in REWARDS])


def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens():
    adv = run("reinforce_pp_baseline")
    centred = []
    for i, r in enumerate(REWARDS):
        members = by_group()[GROUPS[i]]
        centred.append(r - sum(REWARDS[j] for j in members) / len(members))
    mean, std = statistics.mean(centred), statistics.stdev(centred)
    assert adv == pytest.approx([(c - mean) / (std + 1e-6) for c in centred])


def test_psr_nsr_and_raw():
    assert run("psr_nsr") == [1, -1, -1, 1, 1, 1, -1, -1, -1, -1, 1]
    assert run("raw") == REWARDS


def test_dynamic_sampling_drops_zero_variance_groups():
    keep = dynamic_sampling_mask(torch.tensor(REWARDS), torch.tensor(GROUPS)).tolist()
    # group 7 mixed -> kept; group 3 (1, 1, 0) mixed; group 9 mixed; singleton 5 dropped
    assert keep == [True] * 10 + [False]
    keep = dynamic_sampling_mask(torch.tensor([1.0, 1, 0, 0, 0.5, 0]), group_size=2).tolist()
    assert keep == [False, False, False, False, True, True]


def test_unknown_estimator_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"algo.advantage='ppo': must be one of grpo"):
        compute_advantages("ppo", torch.zeros(2), group_size=2)
    assert "rloo" in ADVANTAGE_ESTIMATORS
