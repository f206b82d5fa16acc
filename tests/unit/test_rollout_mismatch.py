"""The train-vs-rollout log-prob mismatch metrics."""

from __future__ import annotations

import math

import torch

from megarl.rollout.mismatch import logprob_mismatch


def test_identical_log_probs_have_no_mismatch() -> None:
    lp = torch.log(torch.rand(4, 7))
    m = logprob_mismatch(lp, lp.clone(), torch.ones(4, 7))
    assert m == {"rollout/logp_abs_diff_mean": 0.0, "rollout/logp_abs_diff_max": 0.0,
                 "rollout/k3_kl": 0.0}


def test_values_and_mask() -> None:
    rollout = torch.tensor([[-1.0, -2.0, -3.0]])
    train = torch.tensor([[-1.5, -1.0, 50.0]])  # the last token is masked out
    m = logprob_mismatch(train, rollout, torch.tensor([[True, True, False]]))
    assert m["rollout/logp_abs_diff_mean"] == 0.75
    assert m["rollout/logp_abs_diff_max"] == 1.0
    expected = ((math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)) / 2
    assert abs(m["rollout/k3_kl"] - expected) < 1e-12


def test_k3_estimates_the_kl_of_the_rollout_to_the_train_policy() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])  # rollout policy (samples come from it)
    q = torch.tensor([0.4, 0.4, 0.2])  # train policy
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    m = logprob_mismatch(q.log()[x], p.log()[x], torch.ones(len(x)))
    exact = float((p * (p / q).log()).sum())
    assert abs(m["rollout/k3_kl"] - exact) < 2e-3
