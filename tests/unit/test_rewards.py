"""Answer extraction, gold normalisation, simple rewards and the math-verify grader."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from megarl.data.answers import (
    extract_boxed,
    final_answer,
    gold_answers,
    is_prose,
    normalise_gold,
    text_key,
)
from megarl.data.rewards import (
    DeadlinePool,
    MathVerifier,
    overlong_penalty,
    verdict_metrics,
)
from megarl.data.toy import toy_reward
from megarl.errors import ConfigError, UserError

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox{3}", "3"),
        ("\\fbox{3} then \\boxed{1}", "1"),
        ("\\boxed 5", "5"),
        ("\\boxed 5. Done", "5"),
        ("$\\boxed 12$", "12"),
        ("\\boxed {8}", "8"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\}}", "\\}"),
        ("\\boxed{a\\\\b}", "a\\\\b"),
        ("\\boxed{\\boxed{9}}", "9"),
        ("\\boxed{}", ""),
        ("\\boxed{2} and \\boxedfoo{3}", "2"),
        ("\\boxed{\\text{(A)}}", "\\text{(A)}"),
    ],
)
def test_extract_boxed(text: str, expected: str) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no answer here",
        "\\boxed",
        "\\boxed   ",
        "\\boxed{\\frac{1}{2}",  # truncated mid-answer
        "\\boxed{1} and later \\boxed{2",  # the last box is unbalanced: no fallback to 1
        "\\boxed{\\}",  # the only closing brace is escaped
        "\\boxedfoo{3}",
        "\\boxed5",
    ],
)
def test_extract_boxed_absent_or_unbalanced(text: str) -> None:
    assert extract_boxed(text) is None


@pytest.mark.parametrize("extract", [extract_boxed, final_answer])
@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
        "\\boxed{" * 20_000,
        "\\boxedx" * 15_000,
        "\\fboxy" * 15_000 + "\\boxedz" * 15_000,
        "x" * 100_000,
        "\\boxed" + " " * 100_000,
        "\\boxed{" + "\\{" * 50_000,
        "answer " * 20_000,
        "Answer:" * 15_000,
        "answer" + " " * 99_994,
    ],
)
def test_extraction_is_linear_on_hostile_text(extract: Callable[[str], object], text: str) -> None:
    start = time.perf_counter()
    extract(text)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the total is 42.\nAnswer: 42", "42"),  # DAPO-Math-17k's requested form
        ("answer : $\\frac{1}{2}$.\n", "\\frac{1}{2}"),
        ("Answer: 3\nWait, no.\nAnswer: 4", "4"),
        ("Final Answer: x=3 ", "x=3"),
        ("\\boxed{2}\nAnswer: 3", "2"),  # a box wins
        ("\\boxed{2\nAnswer: 3", None),  # a cut-off box does not fall back
        ("The answer is 5", None),
        ("Answer:\n", None),
    ],
)
def test_final_answer(text: str, expected: str | None) -> None:
    assert final_answer(text) == expected


# --------------------------------------------------------------------------- golds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (142.0, "142"),
        (2.5, "2.5"),
        (7, "7"),
        ("142.0", "142"),
        ("025", "025"),
        ("['9.6\\n']", "9.6"),
        (["9.6\n"], "9.6"),
        (["$\\frac{1}{2 n+2}$"], "\\frac{1}{2 n+2}"),
        ("['$2^{1009}$']", "2^{1009}"),
        ("#### 18", "18"),
        ("She pays 6 * 3 = 18 dollars.\n#### 1,000", "1000"),
        ("30,000", "30000"),
        ("  $x$  ", "x"),
        ("$$x+1$$", "x+1"),
        ("\\(x\\)", "x"),
        ("\\boxed{5}", "5"),
        ("[-2, 7]", "[-2, 7]"),  # an interval, not a stringified list
        ("[0, 1)", "[0, 1)"),
        ("$a$ and $b$", "a, b"),
        ("['$69$,$84$']", "69, 84"),
        ("$a=2$, $a=-6-4 \\sqrt{2}$", "a=2, a=-6-4 \\sqrt{2}"),
        ("$(-\\infty, 0) \\cup\\{1\\}$.", "(-\\infty, 0) \\cup\\{1\\}"),
        ("$f(x)=x$, where $x$ is real", "$f(x)=x$, where $x$ is real"),
        ("$221,$8$", "221,8"),  # an odd '$' delimits nothing: stray, dropped
        (1e-05, "0.00001"),  # no exponent: LaTeX would read 1e-05 as 1*e-5
        ("\\$36", "\\$36"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        (np.array(["4\n", "4"]), "4"),
        (np.float64(81.0), "81"),
        (np.array([3, 4]), "3"),
    ],
)
def test_normalise_gold(raw: object, expected: str) -> None:
    assert normalise_gold(raw) == expected


def test_gold_alternatives_are_deduplicated_and_ordered() -> None:
    assert gold_answers(["2\n", "2"]) == ("2",)
    assert gold_answers(["-\\frac{1}{3}\n", "-1/3\n"]) == ("-\\frac{1}{3}", "-1/3")
    assert normalise_gold(["-\\frac{1}{3}\n", "-1/3\n"]) == "-\\frac{1}{3}"
    assert gold_answers("['0.01\\n', '0.02\\n']") == ("0.01", "0.02")
    assert gold_answers("18") == ("18",)


PROSE = ("$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive "
         "integer with $\\mho(a)=0$")  # OlympiadBench #73


@pytest.mark.parametrize(
    ("gold", "prose"),
    [(PROSE, True), ("$x$ is even", True), ("x", False), ("\\text{no solution}", False),
     ("a, b", False), ("\\$36", False), ("$\\sin x$, $\\cos x$", False)],
)
def test_is_prose(gold: str, prose: bool) -> None:
    assert is_prose(gold) is prose


def test_text_key_ignores_delimiters_spacing_and_case() -> None:
    written = ("f(x) = ax+b, \\text{where } b \\text{ is an arbitrary integer, and } a\\text{ is "
               "an arbitrary positive integer with }\\, \\mho(a)=0.")
    assert text_key(written) == text_key(PROSE)
    assert text_key("\\text{Where} B") == text_key("where b")
    assert text_key("f(x)=ax+b") != text_key(PROSE)


@pytest.mark.parametrize(
    "raw",
    [None, "", "  $ $ ", float("nan"), float("inf"), True, [], [{"a": 1}], [["1"]], {"a": 1}],
)
def test_normalise_gold_rejects_unusable_rows(raw: object) -> None:
    with pytest.raises(UserError):
        normalise_gold(raw)


def test_normalise_gold_never_evaluates_code(tmp_path) -> None:
    sentinel = tmp_path / "pwned"
    raw = f"[__import__('os').system('touch {sentinel}')]"
    assert normalise_gold(raw) == raw
    assert normalise_gold(f"['{sentinel}'.__class__]") == f"['{sentinel}'.__class__]"
    assert not sentinel.exists()


# --------------------------------------------------------------------------- simple rewards


def test_toy_reward_accepts_any_alternative() -> None:
    assert toy_reward("7 and more", "7") == 1.0
    assert toy_reward("7", ("6", "7")) == 1.0
    assert toy_reward("8", ("6", "7")) == 0.0


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (768, 0.0), (800, -0.125), (896, -0.5), (1023, -255 / 256), (1024, -1.0)],
)
def test_overlong_penalty_dapo(length: int, expected: float) -> None:
    # max_len 1024 with a 256-token buffer: free up to 768, then linear down to -1 at 1024.
    assert overlong_penalty(length, max_len=1024, buffer=256) == pytest.approx(expected)


def test_overlong_penalty_factor_truncation_and_no_buffer() -> None:
    assert overlong_penalty(896, 1024, 256, factor=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(5000, 1024, 256, factor=0.5) == -0.5
    assert overlong_penalty(1024, 1024, 0) == 0.0
    assert overlong_penalty(1025, 1024, 0) == -1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_len": 0, "buffer": 0}, "max_len"),
        ({"max_len": 100, "buffer": 101}, "buffer"),
        ({"max_len": 100, "buffer": -1}, "buffer"),
        ({"max_len": 100, "buffer": 10, "factor": -1.0}, "factor"),
    ],
)
def test_overlong_penalty_rejects_bad_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}="):
        overlong_penalty(10, **kwargs)


# --------------------------------------------------------------------------- math-verify


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier(workers=2, timeout_s=5.0) as v:
        yield v


@pytest.mark.parametrize(
    ("answer", "gold", "reward"),
    [
        ("0.5", "1/2", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\{2,1\\}", "\\{1,2\\}", 1.0),
        ("(x+1)^2", "x^2+2x+1", 1.0),
        ("142.0", "142", 1.0),
        ("90", "90^\\circ", 1.0),
        ("\\text{Evelyn}", "\\text{Evelyn}", 1.0),
        ("(1,2]", "(1, 2]", 1.0),
        ("25", "025", 1.0),
        ("221, 8", "$221,$8$", 1.0),
        ("4", "3", 0.0),
        ("\\frac{1}{3}", "0.5", 0.0),
        ("\\{1,3\\}", "\\{1,2\\}", 0.0),
        ("(x-1)^2", "x^2+2x+1", 0.0),
        ("\\text{Alice}", "\\text{Evelyn}", 0.0),
        ("[1,2]", "(1, 2]", 0.0),
        ("222, 8", "$221,$8$", 0.0),
    ],
)
def test_math_verifier_grades_by_mathematical_equality(
    verifier: MathVerifier, answer: str, gold: str, reward: float
) -> None:
    rewards, _ = verifier.score([f"Thus the answer is $\\boxed{{{answer}}}$."], [gold])
    assert rewards == [reward]


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        (PROSE, 1.0),
        ("f(x) = ax + b, \\text{where } b \\text{ is an arbitrary integer, and } a \\text{ is an "
         "arbitrary positive integer with } \\mho(a)=0", 1.0),
        ("0", 0.0),  # math-verify alone reads the gold as its last formula, \\mho(a)=0
        ("\\mho(a)=0", 0.0),
        ("f(x)=x^2", 0.0),
        ("\\text{wrong}", 0.0),
    ],
)
def test_prose_gold_is_compared_as_text(verifier: MathVerifier, answer: str,
                                        reward: float) -> None:
    verdicts = verifier.grade([f"\\boxed{{{answer}}}"], [[PROSE]])
    assert [v.reward for v in verdicts] == [reward]
    assert verdicts[0].status == ("correct" if reward else "wrong")


def test_prose_and_formula_alternatives_are_both_accepted(verifier: MathVerifier) -> None:
    golds = [(PROSE, "f(x)=ax+b")] * 3
    rewards, _ = verifier.score(["\\boxed{f(x)=b+ax}", f"\\boxed{{{PROSE}}}", "\\boxed{0}"], golds)
    assert rewards == [1.0, 1.0, 0.0]


def test_math_verifier_statuses_and_metrics(verifier: MathVerifier) -> None:
    responses = [
        "\\boxed{2}",  # correct
        "\\boxed{3}",  # wrong
        "I think it is 2",  # no box
        "\\boxed{2",  # unbalanced: no answer
        "\\boxed{@@@}",  # nothing math-verify can parse
        "\\boxed{" + "1" * 5000 + "}",  # longer than max_answer_chars: not even parsed
        "\\boxed{0.02}",  # the second accepted alternative
        "So it is 2.\nAnswer: 2",  # DAPO's form, no box
    ]
    golds: list[str | list[str]] = ["2"] * 6 + [["0.01", "0.02"], "2"]
    verdicts = verifier.grade(responses, golds)
    assert [v.status for v in verdicts] == [
        "correct",
        "wrong",
        "no_answer",
        "no_answer",
        "parse_failure",
        "parse_failure",
        "correct",
        "correct",
    ]
    rewards, metrics = verifier.score(responses, golds)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert metrics == pytest.approx(
        {
            "reward/mean": 3 / 8,
            "reward/no_answer": 2 / 8,
            "reward/parse_failures": 2 / 8,
            "reward/timeouts": 0.0,
            "reward/errors": 0.0,
        }
    )
    assert verdict_metrics([])["reward/mean"] == 0.0


def test_math_verifier_takes_raw_golds_strings_and_sequences(verifier: MathVerifier) -> None:
    rewards, _ = verifier.score(
        ["\\boxed{18}", "\\boxed{9.6}", "\\boxed{142}", "\\boxed{-1/3}", "\\boxed{-1/3}",
         "\\boxed{-2/6}", "\\boxed{1/3}"],
        ["#### 18", "['9.6\\n']", "142.0", "['-\\\\frac{1}{3}\\n', '-1/3\\n']",
         ("-\\frac{1}{3}", "-1/3"), ["0.5", "-\\frac{1}{3}"], ("-\\frac{1}{3}", "-1/3")],
    )
    assert rewards == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_math_verifier_rejects_mismatched_batch(verifier: MathVerifier) -> None:
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        verifier.score(["\\boxed{1}", "\\boxed{2}"], ["1"])


def test_math_verifier_times_out_and_keeps_going() -> None:
    responses = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{1}", "\\boxed{10^{10^{10}}}", "\\boxed{2}"]
    with MathVerifier(workers=2, timeout_s=1.0) as v:
        verdicts = v.grade(responses, ["1", "1", "1", "2"])
    assert [x.status for x in verdicts] == ["timeout", "correct", "timeout", "correct"]
    assert all(x.seconds < 1.5 for x in verdicts)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"max_answer_chars": 0}, "max_answer_chars"),
    ],
)
def test_math_verifier_rejects_bad_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}="):
        MathVerifier(**kwargs)


# --------------------------------------------------------------------------- pool


def stall_ignoring_signals(seconds: float) -> str:
    """Stands in for C code that never returns to the interpreter: SIGALRM is blocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return "finished"


def allocate(n_bytes: int) -> int:
    return len(bytearray(n_bytes))


def test_pool_kills_a_stuck_worker_and_replaces_it() -> None:
    pool = DeadlinePool(workers=2, memory_mb=512)
    try:
        pool.wait_ready()
        start = time.monotonic()
        results = pool.run(
            stall_ignoring_signals, [(30.0,), (0.0,), (30.0,), (0.0,), (0.0,)], timeout_s=1.0
        )
        elapsed = time.monotonic() - start
        assert [r[0] for r in results] == ["timeout", "ok", "timeout", "ok", "ok"]
        assert all(r[1] == "finished" for r in results if r[0] == "ok")
        assert all(r[2] < 1.5 for r in results)
        assert pool.restarts == 2
        assert elapsed < 10.0  # two kills and restarts, not two 30 s stalls
        # the replacements work
        assert [r[0] for r in pool.run(stall_ignoring_signals, [(0.0,)] * 4, 5.0)] == ["ok"] * 4
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(stall_ignoring_signals, [(0.0,)], 1.0)


def test_pool_caps_worker_memory() -> None:
    pool = DeadlinePool(workers=1, memory_mb=256)
    try:
        small, huge = pool.run(allocate, [(10 * 2**20,), (4 * 2**30,)], timeout_s=30.0)
        assert small[:2] == ("ok", 10 * 2**20)
        assert huge[0] == "error" and isinstance(huge[1], MemoryError)
        assert pool.run(allocate, [(2**20,)], timeout_s=30.0)[0][:2] == ("ok", 2**20)
        assert pool.restarts == 0
    finally:
        pool.close()
