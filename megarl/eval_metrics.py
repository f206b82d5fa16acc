"""Evaluation metrics over k sampled answers per problem: pass@k, avg@k, maj@k, and tables.

- ``pass@k``  probability that at least one of k samples is correct, estimated without bias from
              n >= k samples of which c are correct (Chen et al. 2021, "Evaluating Large Language
              Models Trained on Code", the Codex paper): ``1 - C(n-c, k) / C(n, k)``, computed as
              the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that no huge binomial is formed.
- ``avg@k``   mean correctness over k samples (the "avg@16" / "mean@k" of RLVR papers).
- ``maj@k``   correctness of the majority-vote answer over k samples (self-consistency).

``summarise`` uses all n samples for pass@k (the unbiased estimator), and the first k samples
for avg@k and maj@k, so those two equal what a run that drew exactly k samples would report.
Its "mean" row is the unweighted mean over benchmarks, as papers' tables average them.

Pure Python (no torch), so it can run anywhere the results are.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megarl.errors import UserError

if TYPE_CHECKING:
    from rich.table import Table

MEAN_ROW = "mean"
PROBLEMS = "problems"  # the per-benchmark problem count in a summary (total in the mean row)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021), stable for large n."""
    if n < 1 or not 0 <= c <= n:
        raise UserError(f"pass@k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}: count again")
    if not 1 <= k <= n:
        raise UserError(f"pass@{k} needs 1 <= k <= n={n}: sample at least k answers or lower k")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean correctness over the k samples."""
    if len(correct) == 0:
        raise UserError("avg@k needs at least one sample: sample k >= 1 answers")
    return sum(bool(x) for x in correct) / len(correct)


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent non-None answer (None if all None).

    Ties go to the answer that appeared first among the samples, so the vote is deterministic.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return i
    raise AssertionError("unreachable")


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 if the majority-vote answer is correct, else 0.0.

    ``None`` (no answer extracted) never wins a vote; all None scores 0. Ties are broken in favour
    of the answer that appeared first. The majority answer's correctness is that of its first
    sample (samples with the same extracted answer are graded the same).
    """
    if len(answers) != len(correct):
        raise UserError(
            f"maj@k got {len(answers)} answers but {len(correct)} correctness flags: "
            "pass one flag per answer"
        )
    winner = majority_answer(answers)
    return 0.0 if winner is None else float(bool(correct[winner]))


@dataclass(frozen=True)
class ProblemResult:
    """All sampled answers to one problem of one benchmark, and whether each was correct."""

    benchmark: str
    index: int
    answers: tuple[str | None, ...]
    correct: tuple[bool, ...]
    # the greedy decode (``eval.greedy``): its response text, answer and correctness
    greedy_response: str | None = None
    greedy_answer: str | None = None
    greedy_correct: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "correct", tuple(bool(x) for x in self.correct))
        if len(self.answers) != len(self.correct):
            raise UserError(
                f"{self.benchmark}[{self.index}]: {len(self.answers)} answers but "
                f"{len(self.correct)} correctness flags: pass one flag per answer"
            )
        if self.benchmark == MEAN_ROW:
            raise UserError(f"benchmark name {MEAN_ROW!r} is reserved for the mean row: rename it")

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def c(self) -> int:
        return sum(self.correct)


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = sorted(set(ks))
    if not out or any(not isinstance(k, int) or k < 1 for k in out):
        raise UserError(f"ks={list(ks)}: give one or more integers >= 1, e.g. [1, 16]")
    return out


def summarise(results: Sequence[ProblemResult],
              ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{benchmark: {"problems", "avg@k", "pass@k", "maj@k" for k in ks}}`` plus a "mean" row.

    Benchmarks keep the order they first appear in; each metric is a fraction in [0, 1], the
    mean over the benchmark's problems. The "mean" row is the unweighted mean over benchmarks
    (its "problems" is the total).
    """
    ks = _check_ks(ks)
    if not results:
        raise UserError("no evaluation results to summarise: run at least one benchmark problem")
    by_bench: dict[str, list[ProblemResult]] = {}
    for r in results:
        by_bench.setdefault(r.benchmark, []).append(r)

    summary: dict[str, dict[str, float]] = {}
    for bench, problems in by_bench.items():
        small = min(problems, key=lambda p: p.n)
        if small.n < ks[-1]:
            raise UserError(
                f"{bench}[{small.index}] has {small.n} samples but k={ks[-1]} was asked: "
                f"sample at least {ks[-1]} answers per problem or lower k"
            )
        row: dict[str, float] = {PROBLEMS: float(len(problems))}
        for k in ks:
            row[f"avg@{k}"] = _mean(avg_at_k(p.correct[:k]) for p in problems)
        for k in ks:
            row[f"pass@{k}"] = _mean(pass_at_k(p.n, p.c, k) for p in problems)
        for k in ks:
            row[f"maj@{k}"] = _mean(maj_at_k(p.answers[:k], p.correct[:k]) for p in problems)
        if all(p.greedy_correct is not None for p in problems):
            row["greedy@1"] = _mean(float(bool(p.greedy_correct)) for p in problems)
        summary[bench] = row

    rows = list(summary.values())
    names = [n for n in rows[0] if all(n in r for r in rows)]
    mean_row = {name: _mean(r[name] for r in rows) for name in names}
    mean_row[PROBLEMS] = float(sum(r[PROBLEMS] for r in rows))
    summary[MEAN_ROW] = mean_row
    return summary


def write_results(results: list[ProblemResult], path: str | Path) -> Path:
    """Every problem's answers (and greedy response), one JSON line each, written whole or not
    at all: ``megarl eval --samples`` and a run's ``eval/step_N.jsonl``, the record an exported
    checkpoint is checked against (tools/check_export.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in results)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def flatten(summary: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<bench>/<metric>": value}`` for a metrics sink (e.g. ``eval/aime24/avg@16``)."""
    return {f"{prefix}/{bench}/{name}": value
            for bench, row in summary.items() for name, value in row.items()}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


FAMILIES = ("avg", "pass", "maj", "greedy")


def _cells(summary: dict[str, dict[str, float]],
           family: str | None = None) -> tuple[list[str], list[list[str]]]:  # fmt: skip
    """Header and string rows: metrics as percentages with one decimal, as papers print them;
    ``family`` ("avg", "pass" or "maj") keeps that metric's columns only."""
    if not summary:
        raise UserError("empty evaluation summary: summarise some results first")
    if family is not None and family not in FAMILIES:
        raise UserError(f"metric family {family!r}: choose one of {', '.join(FAMILIES)}")
    names = [n for n in next(iter(summary.values()))
             if n != PROBLEMS and (family is None or n.startswith(f"{family}@"))]
    header = ["benchmark", PROBLEMS, *names]
    rows = [[bench, str(int(row.get(PROBLEMS, 0))),
             *(f"{100 * row[n]:.1f}" if n in row else "-" for n in names)]
            for bench, row in summary.items()]
    return header, rows


def format_table(summary: dict[str, dict[str, float]], title: str | None = None,
                 family: str | None = None) -> Table:  # fmt: skip
    """A rich table of a `summarise` result (percentages; ``family`` picks one metric's
    columns); the mean row is set off in bold."""
    from rich.table import Table

    header, rows = _cells(summary, family)
    table = Table(title=title)
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        if row[0] == MEAN_ROW:
            table.add_section()
            table.add_row(*row, style="bold")
        else:
            table.add_row(*row)
    return table


def format_text(summary: dict[str, dict[str, float]], family: str | None = None) -> str:
    """The same table as plain, space-aligned text (for logs and markdown code blocks)."""
    header, rows = _cells(summary, family)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = io.StringIO()
    for j, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                       strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")
        if j == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    return out.getvalue()
