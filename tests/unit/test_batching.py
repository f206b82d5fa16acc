"""`megarl.batching`: the cut of a batch over DP ranks and into micro-batches, by sequence count
or by a token budget; the config field, `megarl plan` and the memory model that use it. The
same numbers through the real Policy in DP2 / PP2: tests/distributed/test_token_budget.py."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.batching import (
    balanced_shares,
    budget_groups,
    contiguous_shares,
    cut_batch,
    row_multiples,
    split_to_count,
)
from megarl.config import load_config
from megarl.errors import ConfigError
from megarl.megatron.packing import pack_groups, padding_sample
from megarl.memory_model import estimate_memory
from megarl.policy_io import TrainSample

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"
RECIPE = ROOT / "examples" / "configs" / "up_gspo_30b.yaml"


def long_tailed(n: int, seed: int = 0) -> list[int]:
    """Response lengths as RL produces them: most short, a few very long."""
    rng = random.Random(seed)
    return [min(int(rng.lognormvariate(5.0, 1.2)) + 2, 8000) for _ in range(n)]


def every_index_once(cut, n: int) -> bool:
    seen = sorted(i for groups in cut.micro_batches for g in groups for i in g)
    return seen == list(range(n))


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_balanced_shares_beat_contiguous_ones(dp: int, seed: int) -> None:
    lengths = long_tailed(64, seed)
    shares = balanced_shares(lengths, dp)
    assert sorted(i for s in shares for i in s) == list(range(64))
    assert all(shares)  # every rank gets a sequence
    totals = [sum(lengths[i] for i in s) for s in shares]
    # LPT's bound: the busiest rank is within the longest sequence of the mean
    assert max(totals) <= sum(lengths) / dp + max(lengths)
    contiguous = [sum(lengths[i] for i in s) for s in contiguous_shares(64, dp)]
    assert max(totals) <= max(contiguous)


def test_shares_are_the_same_on_every_call() -> None:
    lengths = [5, 5, 5, 5, 9, 9, 1, 1]
    assert balanced_shares(lengths, 2) == balanced_shares(list(lengths), 2)
    assert balanced_shares(lengths, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("capacity", [16, 100, 512, 4096])
def test_budget_groups_respect_the_budget(capacity: int) -> None:
    lengths = long_tailed(200, seed=capacity)
    groups = budget_groups(lengths, range(200), capacity)
    assert sorted(i for g in groups for i in g) == list(range(200))
    for g in groups:
        assert sum(lengths[i] for i in g) <= capacity or len(g) == 1  # a long one travels alone
    # first-fit decreasing is within 11/9 of the fewest rows, plus one
    assert len(groups) <= 11 / 9 * -(-sum(min(n, capacity) for n in lengths) // capacity) + 1


def test_split_to_count_splits_the_fullest_then_pads() -> None:
    lengths = [10, 10, 10, 10, 40]
    out = split_to_count([[0, 1, 2, 3], [4]], lengths, 3)
    assert sorted(map(sorted, out)) == [[0, 2], [1, 3], [4]]
    padded = split_to_count([[4]], lengths, 3)
    assert padded == [[4], [], []]
    with pytest.raises(ValueError, match="cannot become"):
        split_to_count([[0], [1]], lengths, 1)


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("budget", [64, 300, 2048])
def test_a_cut_agrees_on_the_count_and_keeps_every_sequence(dp: int, budget: int) -> None:
    lengths = long_tailed(48, seed=budget + dp)
    cut = cut_batch(lengths, dp, max_tokens=budget)
    assert every_index_once(cut, 48)
    assert len({len(groups) for groups in cut.micro_batches}) == 1  # one count on every rank
    for rows, groups in zip(cut.row_lengths, cut.micro_batches, strict=True):
        for row, g in zip(rows, groups, strict=True):
            assert row <= budget or len(g) == 1


def test_multiples_round_sequences_rows_and_the_count() -> None:
    seq_multiple, row_multiple = row_multiples(tp=2, cp=2, sequence_parallel=True)
    assert (seq_multiple, row_multiple) == (4, 8)
    cut = cut_batch([5, 7, 9, 30], 1, max_tokens=20, seq_multiple=4, row_multiple=8,
                    count_multiple=2)
    assert all(row % 8 == 0 and row <= 16 or len(g) == 1
               for row, g in zip(cut.row_lengths[0], cut.micro_batches[0], strict=True))
    assert cut.num_micro_batches % 2 == 0
    with pytest.raises(ValueError, match="below one row's multiple 8"):
        cut_batch([5], 1, max_tokens=7, row_multiple=8)


def test_fixed_count_cut_is_contiguous_as_before() -> None:
    cut = cut_batch([3] * 8, 2, micro_batch_size=2)
    assert cut.micro_batches == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="exactly one"):
        cut_batch([3], 1, micro_batch_size=1, max_tokens=4)


def test_stats_show_what_the_budget_buys_on_a_long_tail() -> None:
    lengths = long_tailed(256, seed=3)
    fixed = cut_batch(lengths, 2, micro_batch_size=8).stats(lengths)
    budget = cut_batch(lengths, 2, max_tokens=4096).stats(lengths)
    assert budget["batch/dp_imbalance"] < fixed["batch/dp_imbalance"]
    assert budget["batch/dp_imbalance"] < 1.02
    assert budget["batch/row_tokens/max"] <= max(4096, max(lengths))
    assert fixed["batch/padding_frac"] == 0.0  # THD packing pads nothing here
    vpp = cut_batch(lengths, 2, max_tokens=4096, count_multiple=2, fixed_shape=True)
    assert vpp.stats(lengths)["batch/padding_frac"] > 0  # rows padded to the longest


def sample(n: int, **fields) -> TrainSample:
    mask = torch.ones(n, dtype=torch.bool)
    mask[0] = False
    return TrainSample(torch.arange(n) % 7, mask, torch.tensor(1.0), **fields)


def test_padding_micro_batch_trains_nothing_and_carries_every_field() -> None:
    like = sample(5, old_logprobs=torch.zeros(5), ref_logprobs=torch.zeros(5),
                  rollout_logprobs=torch.zeros(5),
                  routed_experts=torch.zeros(5, 3, 2, dtype=torch.int64))
    pad = padding_sample(like)
    assert not pad.loss_mask.any() and float(pad.advantages) == 0.0
    assert pad.ref_logprobs is not None and pad.rollout_logprobs is not None
    assert pad.routed_experts.shape == (2, 3, 2)
    assert pad.routed_experts[0, 0].tolist() == [0, 1]  # distinct experts, as routers need
    [real, empty] = pack_groups([like], [[0], []], seq_multiple=4, row_multiple=8)
    assert empty.num_tokens == 0 and empty.num_sequences == 0 and empty.row_length == 8
    assert set(empty.extras) == set(real.extras)


# ---- the config field, the plan and the memory model -----------------------------------------

def test_the_budget_is_validated_in_one_line() -> None:
    with pytest.raises(ConfigError, match="trainer.max_tokens_per_micro_batch") as info:
        load_config(QUICKSTART, ["trainer.max_tokens_per_micro_batch=0"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="must be >= 2 .*tp=2"):
        load_config(RECIPE, ["trainer.max_tokens_per_micro_batch=1"])
    with pytest.raises(ConfigError, match="trainer.mini_batch_size.*one sequence at least"):
        load_config(QUICKSTART, ["parallel.world_size=null", "parallel.dp=128",
                                 "trainer.mini_batch_size=64",
                                 "trainer.max_tokens_per_micro_batch=64"])
    # a budget frees the micro-batch count from dividing the mini-batch
    c = load_config(QUICKSTART, ["parallel.world_size=2", "trainer.micro_batch_size=64",
                                 "trainer.max_tokens_per_micro_batch=64"])
    assert c.micro_batch_row_tokens == 64


def test_memory_model_uses_the_budget() -> None:
    seq = 2048 + 20480
    counted = estimate_memory(load_config(RECIPE, ["trainer.micro_batch_size=2"]))
    same = estimate_memory(load_config(RECIPE, [f"trainer.max_tokens_per_micro_batch={2 * seq}"]))
    assert same.line("activations").gib == pytest.approx(counted.line("activations").gib)
    small = estimate_memory(load_config(RECIPE, ["trainer.max_tokens_per_micro_batch=4096"]))
    one = estimate_memory(load_config(RECIPE))  # micro_batch_size 1: one full-length sequence
    # a budget under one sequence still holds a full-length sequence, alone
    assert small.line("activations").gib == pytest.approx(one.line("activations").gib)
    big = estimate_memory(load_config(RECIPE, [f"trainer.max_tokens_per_micro_batch={4 * seq}"]))
    assert big.line("activations").gib > same.line("activations").gib
    assert f"{4 * seq} tok" in big.line("activations").formula


def test_plan_shows_the_budget() -> None:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "megarl", "plan", str(QUICKSTART),
                        "trainer.max_tokens_per_micro_batch=12"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "<= 12 tokens (packed, DP-balanced by tokens" in r.stdout
    assert "a 19-token sequence travels alone (row 19)" in r.stdout
    assert "19 tok/1 CP" in r.stdout  # the activations at that row
