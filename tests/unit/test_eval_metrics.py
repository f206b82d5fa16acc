"""pass@k / avg@k / maj@k against brute force, and the per-benchmark summary."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from rich.console import Console

from megarl.errors import UserError
from megarl.eval_metrics import (
    MEAN_ROW,
    ProblemResult,
    avg_at_k,
    flatten,
    format_table,
    format_text,
    maj_at_k,
    majority_answer,
    pass_at_k,
    summarise,
)


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (c correct) holding at least one correct one."""
    samples = [i < c for i in range(n)]
    subsets = list(itertools.combinations(samples, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


CASES = [(n, c, k) for n in range(1, 11) for c in range(n + 1) for k in range(1, n + 1)]


@pytest.mark.parametrize(("n", "c", "k"), CASES)
def test_pass_at_k_matches_brute_force(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 64])
def test_pass_at_k_edge_cases(n: int) -> None:
    for k in range(1, n + 1):
        assert pass_at_k(n, 0, k) == 0.0
        assert pass_at_k(n, n, k) == 1.0
    for c in range(n + 1):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
        assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(1000, 500) overflows a float; the product form does not.
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 <= pass_at_k(10_000, 1, 1) <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 2, 5), (4, 2, 0), (0, 0, 1), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_input(n: int, c: int, k: int) -> None:
    with pytest.raises(UserError):
        pass_at_k(n, c, k)


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([False]) == 0.0
    with pytest.raises(UserError):
        avg_at_k([])


def test_maj_at_k_plain_majority() -> None:
    answers = ["1", "2", "2", "3", "2"]
    correct = [True, False, False, False, False]
    assert maj_at_k(answers, correct) == 0.0
    assert maj_at_k(answers, [False, True, True, False, True]) == 1.0


def test_maj_at_k_tie_goes_to_first_seen_answer() -> None:
    answers = ["b", "a", "a", "b"]
    assert majority_answer(answers) == 0
    assert maj_at_k(answers, [True, False, False, True]) == 1.0
    assert maj_at_k(answers, [False, True, True, False]) == 0.0
    assert maj_at_k(["x", "y"], [False, True]) == 0.0


def test_maj_at_k_none_never_wins() -> None:
    # None is the most common "answer" but never votes.
    assert maj_at_k([None, None, None, "7"], [False, False, False, True]) == 1.0
    assert maj_at_k([None, None, "3", "4", "4"], [False, False, True, False, False]) == 0.0
    assert maj_at_k([None, None], [False, False]) == 0.0
    assert majority_answer([None]) is None


def test_maj_at_k_rejects_length_mismatch() -> None:
    with pytest.raises(UserError):
        maj_at_k(["a", "b"], [True])


def problem(bench: str, i: int, answers: list[str | None], correct: list[bool]) -> ProblemResult:
    return ProblemResult(bench, i, tuple(answers), tuple(correct))


def test_summarise_per_benchmark_and_unweighted_mean() -> None:
    results = [
        problem("aime", 0, ["1", "1", "2", "1"], [True, True, False, True]),
        problem("aime", 1, ["5", "6", "6", None], [True, False, False, False]),
        problem("math", 0, ["x", "x", "x", "x"], [True, True, True, True]),
        problem("math", 1, ["y", "z", "y", "y"], [False, True, False, False]),
        problem("math", 2, [None, None, None, None], [False, False, False, False]),
    ]
    s = summarise(results, ks=[4, 1])
    assert list(s) == ["aime", "math", MEAN_ROW]
    assert list(s["aime"]) == ["problems", "avg@1", "avg@4", "pass@1", "pass@4", "maj@1", "maj@4"]

    aime, math_ = s["aime"], s["math"]
    assert aime["problems"] == 2 and math_["problems"] == 3
    assert aime["avg@1"] == pytest.approx((1 + 1) / 2)  # first samples only
    assert aime["avg@4"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert aime["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)  # unbiased: c / n
    assert aime["pass@4"] == pytest.approx(1.0)
    assert aime["maj@4"] == pytest.approx((1 + 0) / 2)
    assert math_["avg@4"] == pytest.approx((1 + 1 / 4 + 0) / 3)
    assert math_["pass@4"] == pytest.approx(2 / 3)
    assert math_["maj@4"] == pytest.approx(1 / 3)
    assert math_["maj@1"] == pytest.approx(1 / 3)

    mean = s[MEAN_ROW]
    assert mean["problems"] == 5
    for name in aime:
        if name != "problems":
            assert mean[name] == pytest.approx((aime[name] + math_[name]) / 2)  # not per problem

    flat = flatten(s)
    assert flat["eval/aime/avg@4"] == aime["avg@4"]
    assert flat["eval/mean/pass@1"] == mean["pass@1"]


def test_summarise_rejects_bad_input() -> None:
    results = [problem("aime", 0, ["1", "2"], [True, False])]
    with pytest.raises(UserError, match="k=4"):
        summarise(results, ks=[4])
    with pytest.raises(UserError):
        summarise(results, ks=[])
    with pytest.raises(UserError):
        summarise(results, ks=[0])
    with pytest.raises(UserError):
        summarise([], ks=[1])
    with pytest.raises(UserError):
        problem("aime", 0, ["1"], [True, False])
    with pytest.raises(UserError):
        problem(MEAN_ROW, 0, ["1"], [True])


def test_greedy_at_1_is_the_greedy_decode_accuracy() -> None:
    results = [ProblemResult("a", 0, ("1", "2"), (True, False), "1<eos>", "1", True),
               ProblemResult("a", 1, ("3", "3"), (False, False), "4", "4", False),
               ProblemResult("b", 0, ("5", "5"), (True, True), "5", "5", True)]
    s = summarise(results, ks=[1, 2])
    assert s["a"]["greedy@1"] == 0.5 and s["b"]["greedy@1"] == 1.0
    assert s[MEAN_ROW]["greedy@1"] == 0.75  # unweighted over benchmarks
    assert format_text(s, family="greedy").splitlines()[0].split() == [
        "benchmark", "problems", "greedy@1"]
    # without greedy decodes (eval.greedy off) there is no column
    assert "greedy@1" not in summarise([problem("a", 0, ["1"], [True])], ks=[1])["a"]


def test_tables_render() -> None:
    results = [problem("aime24", 0, ["1", "2"], [True, False]),
               problem("math500", 0, ["3", "3"], [True, True])]
    s = summarise(results, ks=[1, 2])
    text = format_text(s)
    lines = text.splitlines()
    assert lines[0].split() == ["benchmark", "problems", "avg@1", "avg@2", "pass@1", "pass@2",
                                "maj@1", "maj@2"]
    assert lines[2].split() == ["aime24", "1", "100.0", "50.0", "50.0", "100.0", "100.0", "100.0"]
    assert lines[-1].split()[:3] == ["mean", "2", "100.0"]
    assert len({len(line) for line in lines[:2]}) == 1

    console = Console(record=True, width=120)
    console.print(format_table(s, title="eval"))
    rendered = console.export_text()
    assert "math500" in rendered and "pass@2" in rendered and "75.0" in rendered
    # one metric family per table, as `megarl eval` prints them
    passes = format_text(s, family="pass").splitlines()
    assert passes[0].split() == ["benchmark", "problems", "pass@1", "pass@2"]
    assert passes[2].split() == ["aime24", "1", "50.0", "100.0"]
    with pytest.raises(UserError, match="family"):
        format_text(s, family="best")
