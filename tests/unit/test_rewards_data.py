"""The math grader on real benchmark golds and on 1,000 hostile answers.

Needs the offline evaluation suite at ../shared/data (see its README); skipped without it.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from megarl.data.answers import gold_answers, is_prose
from megarl.data.rewards import MathVerifier, Verdict
from tests.unit.offline_data import DATA, needs_data

SPLITS = ("aime", "amc", "math", "minerva", "olympiad_bench")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _wrong_answers(alternatives: tuple[str, ...]) -> list[str]:
    """Answers no alternative accepts: one more than the largest number (or a word), and a
    fraction no benchmark has for an answer."""
    if all(_NUMBER.fullmatch(a) for a in alternatives):
        first = format(max(Decimal(a) for a in alternatives) + 1, "f")
    else:
        first = "\\text{wrong}"
    return [first, "-\\frac{1}{7}"]


def _grade(responses: list[str], golds: list[tuple[str, ...]]) -> list[Verdict]:
    start = time.monotonic()
    with MathVerifier(workers=2, timeout_s=5.0) as verifier:
        verdicts = verifier.grade(responses, golds)
    print(f"graded {len(responses)} benchmark answers in {time.monotonic() - start:.1f} s")
    return verdicts


@pytest.mark.slow
@needs_data
def test_every_benchmark_gold_verifies_against_itself_and_rejects_wrong_answers() -> None:
    """Every gold alternative of every problem of the five sets, written as ``\\boxed{}``,
    scores 1 against the problem's golds (as the loader reads them); wrong answers score 0."""
    import datasets

    suite = datasets.load_from_disk(str(DATA / "evaluation_suite"))
    rows = [(split, i, raw) for split in SPLITS for i, raw in enumerate(suite[split]["answer"])]
    assert len(rows) == 30 + 83 + 500 + 272 + 675
    responses: list[str] = []
    golds: list[tuple[str, ...]] = []
    labels: list[tuple[str, int, str, float]] = []
    for split, i, raw in rows:
        alternatives = gold_answers(raw)
        for gold in alternatives:  # clean: no stray white space, newline or '$' delimiter
            assert gold == gold.strip() and "\n" not in gold, gold
            assert is_prose(gold) or not _UNESCAPED_DOLLAR.search(gold), gold
        cases = [(a, 1.0) for a in alternatives] + [(w, 0.0) for w in _wrong_answers(alternatives)]
        for answer, expected in cases:
            responses.append(f"The answer is \\boxed{{{answer}}}")
            golds.append(alternatives)
            labels.append((split, i, answer, expected))

    verdicts = _grade(responses, golds)
    counts: dict[tuple[str, float], Counter[float]] = {}
    for (split, _, _, expected), v in zip(labels, verdicts, strict=True):
        counts.setdefault((split, expected), Counter())[v.reward] += 1
    for (split, expected), c in counts.items():
        print(f"  {split:15s} {'gold' if expected else 'wrong'}: {dict(c)}")
    failures = [
        f"{split}[{i}] answer={answer!r} gold={gold!r}: {v.status}"
        for (split, i, answer, expected), gold, v in zip(labels, golds, verdicts, strict=True)
        if v.reward != expected
    ]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:50])


@pytest.mark.slow
@needs_data
def test_the_prose_gold_of_olympiad_bench_is_graded_as_text() -> None:
    """OlympiadBench #73, the sets' one prose gold: its last formula (``\\mho(a)=0``) is what
    math-verify alone would compare, so ``0`` would score 1."""
    import datasets

    answers = datasets.load_from_disk(str(DATA / "evaluation_suite" / "olympiad_bench"))["answer"]
    prose = [i for i, raw in enumerate(answers) if any(map(is_prose, gold_answers(raw)))]
    assert prose == [73]
    gold = gold_answers(answers[73])
    spelled = ("f(x) = ax+b, \\text{where } b \\text{ is an arbitrary integer, and } a \\text{ is "
               "an arbitrary positive integer with } \\mho(a) = 0")
    cases = [(gold[0], 1.0), (spelled, 1.0), ("0", 0.0), ("\\mho(a)=0", 0.0), ("f(x)=x", 0.0)]
    verdicts = _grade([f"\\boxed{{{answer}}}" for answer, _ in cases], [gold] * len(cases))
    assert [v.reward for v in verdicts] == [expected for _, expected in cases]


def _adversarial_answers(sentinel: Path, rng: random.Random) -> list[tuple[str, str]]:
    """1,000 ``(kind, response)`` pairs built to hang, exhaust or exploit a grader."""
    out: list[tuple[str, str]] = []

    def add(kind: str, count: int, make: Callable[[int], str]) -> None:
        out.extend((kind, make(k)) for k in range(count))

    # Formulas that grow with k: (kind, count, answer with @ for the number, @'s first value).
    # Huge exponents (sympy evaluates integer powers eagerly), sympy-hostile calculus, and
    # numbers too big to hold.
    growing = [
        ("exponent", 10, "10^{10^{@}}", 10),
        ("exponent", 10, "x^{10^{@}}", 10),
        ("exponent", 10, "(1+x)^{@}", 10**6),
        ("exponent", 10, "@!", 10**5),
        ("exponent", 10, "10^{-10^{@}}", 10),
        ("exponent", 10, "\\sqrt[10^{@}]{2}", 10),
        ("python", 40, "10**10**@", 10),
        ("calculus", 20, "\\prod_{i=1}^{10^{@}} i", 10),
        ("calculus", 20, "\\sum_{i=1}^{10^{@}} i^{i}", 9),
        ("calculus", 10, "\\int_0^1 e^{x^{@}} dx", 1000),
        ("calculus", 10, "\\lim_{x\\to 0} \\sin(x)^{x^{@}}", 1000),
        ("bignum", 20, "1e@", 10**6),
    ]
    for kind, count, formula, first in growing:
        add(kind, count, lambda k, f=formula, n=first: f"\\boxed{{{f.replace('@', str(n + k))}}}")

    def tower(k: int) -> str:  # like 9^{9^{9^{9}}}
        a, b, c, d = (rng.randint(2, 9) for _ in range(4))
        return f"\\boxed{{{a}^{{{b}^{{{c}^{{{d}}}}}}}}}"

    add("tower", 20, tower)
    # Deep nesting, unbalanced braces, 100 kB strings and long numbers, each built as
    # begin + piece * n + middle + closing * n + end: (kind, count, begin, piece, middle,
    # closing, end, n as a function of k).
    repeated = [
        ("nesting", 30, "\\boxed{", "\\frac{", "1", "}{2}", "}", lambda k: 1000),  # > length cap
        ("nesting", 15, "\\boxed{", "\\frac{", "1", "}{2}", "}", lambda k: 20 + k),
        ("nesting", 15, "\\boxed{", "\\sqrt{", "2", "}", "}", lambda k: 30 + k),
        ("nesting", 20, "\\boxed{", "(", "1", ")", "}", lambda k: 100 + k),
        ("nesting", 20, "\\boxed{", "{", "", "}", "}", lambda k: 1000 * (k + 1)),
        ("unbalanced", 30, "\\boxed{", "{", "1", "", "", lambda k: k + 1),
        ("unbalanced", 30, "\\boxed{1", "}", "", "{", "", lambda k: k + 2),
        ("unbalanced", 20, "\\boxed{\\frac{1}{2}", "\\boxed{", "", "", "", lambda k: k + 1),
        ("unbalanced", 20, "\\boxed{", "\\left(", "x", "", "}", lambda k: k + 5),
        ("100kB", 10, "\\boxed{", "7", "", "", "}", lambda k: 100_000),
        ("100kB", 10, "", "x+", "", "", "", lambda k: 50_000),
        ("100kB", 10, "", "\\boxed{", "", "", "", lambda k: 15_000),
        ("100kB", 10, "\\boxed{1}", " \\frac{", "", "", "", lambda k: 15_000),
        ("100kB", 10, "\\boxed{", "a^", "b", "", "}", lambda k: 50_000),
        ("100kB", 10, "", "$", "\\boxed{$1$}", "", "", lambda k: 100_000),
        ("bignum", 20, "\\boxed{", "", "9", "9", "}", lambda k: 1000 + k),
        ("bignum", 20, "\\boxed{0.", "0", "1", "", "}", lambda k: 1000 + k),
    ]
    for kind, count, begin, piece, middle, closing, end, times in repeated:
        add(kind, count, lambda k, b=begin, p=piece, m=middle, c=closing, e=end, t=times:
            b + p * t(k) + m + c * t(k) + e)
    # code injection: must never run
    payloads = [
        f"__import__('os').system('touch {sentinel}')",
        f'__import__("os").system("touch {sentinel}")',
        f"eval(\"open('{sentinel}', 'w')\")",
        f"exec(\"open('{sentinel}', 'w').close()\")",
        f"open('{sentinel}', 'w')",
        f"__import__('subprocess').run(['touch', '{sentinel}'])",
        f"(lambda: __import__('pathlib').Path('{sentinel}').touch())()",
        f"$(touch {sentinel})",
        f"`touch {sentinel}`",
        f"\\input{{{sentinel}}}",
        f"\\write18{{touch {sentinel}}}",
        f"Symbol('x').__class__.__mro__[-1].__subclasses__() or open('{sentinel}','w')",
        f"1+__import__('os').system('touch {sentinel}')",
        f"x^{{__import__('os').system('touch {sentinel}')}}",
        f"\\text{{__import__('os').system('touch {sentinel}')}}",
    ]
    add("code", 150, lambda k: f"\\boxed{{{payloads[k % len(payloads)]}}}" + " " * (k // 15))
    add("code", 45, lambda k: f"Answer: {payloads[k % len(payloads)]}" + " " * (k // 15))
    # random LaTeX soup, braces closed so that most of it reaches the parser
    tokens = [
        "\\frac{", "}{", "^", "_", "\\sqrt{", "\\sum", "\\int", "\\left(", "\\right)", "x", "y",
        "1", "9", "+", "-", "=", "\\cdot", "\\infty", "!", "\\pi", "e", "\\{", "\\}", "[", "]",
        ",", "\\cup", "\\le", "\\text{", "\\begin{pmatrix}", "&", "\\\\", "\\end{pmatrix}",
    ]  # fmt: skip

    def soup(k: int) -> str:
        body = "".join(rng.choices(tokens, k=rng.randint(1, 40)))
        depth = body.replace("\\{", "").count("{") - body.replace("\\}", "").count("}")
        return "\\boxed{" + body + "}" * depth + "}"

    add("soup", 260, soup)
    # odd characters
    odd = ["\x00", "\u202e", "\ud800", "\ufeff", "\x1b[2J", "💥", "\r", "\t", "\\", "\u0301"]
    add("characters", 45, lambda k: "\\boxed{" + odd[k % len(odd)] * (k + 1) + "1}")
    assert len(out) == 1000, len(out)
    return out


@pytest.mark.slow
def test_adversarial_answers_are_bounded_and_never_executed(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    kinds, responses = zip(*_adversarial_answers(sentinel, random.Random(0)), strict=True)
    workers, timeout_s = 4, 1.0
    start = time.monotonic()
    with MathVerifier(workers=workers, timeout_s=timeout_s, memory_mb=512) as verifier:
        verdicts = verifier.grade(responses, ["42"] * len(responses))
        restarts = verifier.worker_restarts
    wall = time.monotonic() - start

    by_kind: dict[str, Counter[str]] = {}
    for kind, verdict in zip(kinds, verdicts, strict=True):
        by_kind.setdefault(kind, Counter())[verdict.status] += 1
    seconds = sorted(v.seconds for v in verdicts)
    slowest = seconds[-1]
    print(f"\n1000 adversarial answers in {wall:.1f} s; per answer median {seconds[500]:.2f} s, "
          f"99th percentile {seconds[990]:.2f} s, slowest {slowest:.2f} s; "
          f"{restarts} stuck workers killed")  # fmt: skip
    for kind, counts in by_kind.items():
        print(f"  {kind:11s} {dict(counts)}")

    assert not sentinel.exists(), "the grader executed model text"
    assert len(verdicts) == 1000
    # Each answer is cut off at its deadline. The slack is OS scheduling on a shared 2-vCPU
    # machine, where even an idle process was seen to oversleep by 2.7 s during this test.
    assert slowest <= timeout_s + 3.0
    assert wall < timeout_s * math.ceil(1000 / workers) + 30
    assert all(v.reward == 0.0 for v in verdicts)  # none of them is 42
    assert not any(v.status == "error" for v in verdicts)
