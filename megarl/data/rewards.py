"""Verifiable rewards: math answers graded by math-verify in sandboxed worker processes.

Model text is hostile input for a grader: ``\\boxed{9^{9^{9^9}}}`` makes sympy compute forever,
a 1000-deep ``\\frac`` exhausts the parser, and math-verify's own timeout uses ``signal.alarm``
(main thread only). So every answer is graded in a worker process with

* a soft deadline (an interval timer in the worker raising out of sympy, worker survives),
* a hard deadline (``timeout_s`` after submission the worker is killed and a fresh one
  started: a stuck future cannot be cancelled, only its process),
* an address-space cap (``RLIMIT_AS``): runaway allocations raise ``MemoryError``,
* LaTeX parsing only (no ``ExprExtractionConfig``, which goes through sympy's ``eval``-based
  ``parse_expr``), so model text is never run as code.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

from megarl.data.answers import final_answer, gold_answers, is_prose, text_key
from megarl.errors import ConfigError

Status = Literal["correct", "wrong", "no_answer", "parse_failure", "timeout", "error"]
STATUSES: tuple[Status, ...] = (
    "correct",
    "wrong",
    "no_answer",
    "parse_failure",
    "timeout",
    "error",
)
# Worker start-up (interpreter + sympy + antlr imports) is not charged to a task's deadline.
_STARTUP_TIMEOUT_S = 300.0
# Fraction of the hard deadline after which the worker interrupts itself, and how often it
# repeats the interruption until the task gives up.
_SOFT_FRACTION = 0.8
_RETICK_S = 0.05


# --------------------------------------------------------------------------- rewards


def overlong_penalty(response_len: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), added to the task reward.

    0 up to ``max_len - buffer`` tokens, then linear down to ``-factor`` at ``max_len`` (and
    beyond: a truncated response is punished fully), so length pressure is smooth rather than
    a cliff at truncation.
    """
    if max_len <= 0:
        raise ConfigError("max_len", max_len, "must be a positive token count")
    if not 0 <= buffer <= max_len:
        raise ConfigError("buffer", buffer, f"must be in [0, max_len={max_len}]")
    if factor < 0:
        raise ConfigError("factor", factor, "must be >= 0 (the penalty magnitude)")
    if response_len < 0:
        raise ValueError(f"response_len={response_len} is negative")
    start = max_len - buffer
    if response_len <= start:
        return 0.0
    if response_len >= max_len:
        return -factor
    return -factor * (response_len - start) / buffer


@dataclass(frozen=True)
class Verdict:
    """How one response was graded; ``seconds`` runs from dispatch to a worker until its
    result or its kill (0 when it was never sent)."""

    reward: float
    status: Status
    seconds: float


class MathVerifier:
    """Scores ``(response, gold)`` pairs with math-verify in a pool of sandboxed workers.

    The answer is the response's `final_answer`: its last ``\\boxed{}``, or DAPO's ``Answer:``
    line in a response with no box (neither: reward 0, status ``no_answer``). The gold (a
    string, or a sequence of accepted alternatives) goes through `gold_answers` and is parsed
    the same way, wrapped in ``\\boxed{}``; the answer is correct when it equals any
    alternative. A prose gold (`is_prose`) is compared as text instead. Answers longer than
    ``max_answer_chars`` are ``parse_failure`` without being parsed.

    ``timeout_s`` bounds each answer's time on a worker; ``memory_mb`` is the address space a
    worker may add to its start-up footprint. Use as a context manager, or call `close`.
    """

    def __init__(
        self,
        workers: int = 4,
        timeout_s: float = 5.0,
        memory_mb: int = 2048,
        max_answer_chars: int = 2000,
    ) -> None:
        if workers < 1:
            raise ConfigError("workers", workers, "must be >= 1")
        if not timeout_s > 0:
            raise ConfigError("timeout_s", timeout_s, "must be > 0 seconds")
        if memory_mb < 128:
            raise ConfigError("memory_mb", memory_mb, "must be >= 128 (MiB per worker)")
        if max_answer_chars < 1:
            raise ConfigError("max_answer_chars", max_answer_chars, "must be >= 1")
        self.timeout_s = float(timeout_s)
        self.max_answer_chars = max_answer_chars
        self._pool = DeadlinePool(workers, memory_mb=memory_mb)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (killing any that are stuck)."""
        self._pool.close()

    @property
    def worker_restarts(self) -> int:
        """Workers killed for overrunning their deadline (or crashing) so far."""
        return self._pool.restarts

    def grade(
        self, responses: Sequence[str], golds: Sequence[str | Sequence[str]]
    ) -> list[Verdict]:
        """One `Verdict` per pair; all pairs are in flight across the workers at once."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        verdicts: list[Verdict | None] = [None] * len(responses)
        tasks: list[tuple[Any, ...]] = []
        where: list[int] = []
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            answer = final_answer(response)
            if answer is None or not answer.strip():
                verdicts[i] = Verdict(0.0, "no_answer", 0.0)
            elif len(answer) > self.max_answer_chars:
                verdicts[i] = Verdict(0.0, "parse_failure", 0.0)
            else:
                alternatives = gold_answers(gold)
                prose = {text_key(g) for g in alternatives if is_prose(g)}
                formulas = tuple(g for g in alternatives if not is_prose(g))
                if prose and text_key(answer) in prose:
                    verdicts[i] = Verdict(1.0, "correct", 0.0)
                elif not formulas:
                    verdicts[i] = Verdict(0.0, "wrong", 0.0)
                else:
                    tasks.append((answer, formulas, _SOFT_FRACTION * self.timeout_s))
                    where.append(i)
        for i, (outcome, value, seconds) in zip(
            where, self._pool.run(_grade_in_worker, tasks, self.timeout_s), strict=True
        ):
            status: Status = value if outcome == "ok" else outcome  # type: ignore[assignment]
            verdicts[i] = Verdict(1.0 if status == "correct" else 0.0, status, seconds)
        return [v for v in verdicts if v is not None]

    def score(
        self, responses: Sequence[str], golds: Sequence[str | Sequence[str]]
    ) -> tuple[list[float], dict[str, float]]:
        """Rewards (1.0 correct, else 0.0) and batch metrics.

        Metrics are fractions of the batch, so they average across steps: ``reward/mean``,
        ``reward/no_answer``, ``reward/parse_failures`` (answer not parseable as math, too long,
        or over the worker's memory cap),
        ``reward/timeouts`` (soft or hard deadline hit) and ``reward/errors`` (grader or
        worker crash).
        """
        verdicts = self.grade(responses, golds)
        return [v.reward for v in verdicts], verdict_metrics(verdicts)


def verdict_metrics(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Batch fractions of each outcome (all 0.0 for an empty batch)."""
    n = max(len(verdicts), 1)

    def frac(status: str) -> float:
        return sum(v.status == status for v in verdicts) / n

    return {
        "reward/mean": sum(v.reward for v in verdicts) / n,
        "reward/no_answer": frac("no_answer"),
        "reward/parse_failures": frac("parse_failure"),
        "reward/timeouts": frac("timeout"),
        "reward/errors": frac("error"),
    }


# --------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    """Raised by the worker's own timer; BaseException so sympy's ``except Exception`` lets it
    through."""


_IN_TASK = False


def _on_alarm(signum: int, frame: object) -> None:
    if _IN_TASK:  # a late tick after the task finished must not kill the idle worker
        raise _SoftTimeout


def _init_worker(memory_mb: int) -> None:
    """Import the grader, then cap the address space at start-up footprint + ``memory_mb``.

    The cap is relative because a spawned worker re-imports the parent's ``__main__`` (which
    may pull in torch: ~3 GiB of mapped libraries) before this runs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGALRM, _on_alarm)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs whole inputs
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    from math_verify import verify

    # Warm up with the config tasks use: math-verify caches the compiled regexes of one config.
    verify(_parse_boxed("1"), _parse_boxed("\\frac{2}{2}"), timeout_seconds=None)
    limit = _address_space_bytes() + memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except OSError:  # no procfs: fall back to the peak resident size
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ping() -> bool:
    return True


def _parse_boxed(text: str) -> list[Any]:
    """math-verify's parse of ``\\boxed{text}``: LaTeX only, its own alarm off (the caller's
    interval timer covers parse and verify together)."""
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None)


def _grade_in_worker(answer: str, golds: tuple[str, ...], soft_timeout_s: float) -> str:
    """Status of one answer against any of the golds (runs in a worker's main thread)."""
    from math_verify import verify
    from sympy import Basic, MatrixBase

    global _IN_TASK
    _IN_TASK = True
    # Repeats: a tick that lands in a finaliser or weakref callback is swallowed, the next is not.
    signal.setitimer(signal.ITIMER_REAL, soft_timeout_s, _RETICK_S)
    try:
        gold_parsed = [g for gold in golds for g in _parse_boxed(gold)]
        if not gold_parsed:
            return "error"
        pred = _parse_boxed(answer)
        if verify(gold_parsed, pred, timeout_seconds=None):
            return "correct"
        return "wrong" if any(isinstance(p, Basic | MatrixBase) for p in pred) else "parse_failure"
    except _SoftTimeout:
        return "timeout"
    except MemoryError:
        return "parse_failure"
    finally:
        _IN_TASK = False
        signal.setitimer(signal.ITIMER_REAL, 0)


# --------------------------------------------------------------------------- pool


class _Slot:
    """One single-process executor, so a stuck task can be killed without collateral."""

    def __init__(self, context: Any, memory_mb: int) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_init_worker, initargs=(memory_mb,)
        )
        self.ready: Future[Any] | None = self.executor.submit(_ping)
        self.created = time.monotonic()
        self.task: Future[Any] | None = None
        self.index = -1
        self.started = 0.0

    def kill(self) -> None:
        """SIGKILL the worker without waiting: tearing down gigabytes of a runaway computation
        can take a second, and the executor's own thread reaps it."""
        kill_workers = getattr(self.executor, "kill_workers", None)  # Python >= 3.14
        if kill_workers is not None:
            kill_workers()
        else:
            for process in list((getattr(self.executor, "_processes", None) or {}).values()):
                process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


class DeadlinePool:
    """Runs tasks on ``workers`` processes; a task past its deadline has its process killed
    and replaced, and is reported as ``"timeout"``.

    Each worker is its own one-process `ProcessPoolExecutor` (started with "forkserver",
    "spawn" where that is unavailable), so killing one never loses another worker's task.
    """

    def __init__(self, workers: int, memory_mb: int) -> None:
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context(
            "forkserver" if "forkserver" in methods else "spawn"
        )
        self._memory_mb = memory_mb
        self._slots = [_Slot(self._context, memory_mb) for _ in range(workers)]
        self.restarts = 0

    def run(
        self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], timeout_s: float
    ) -> list[tuple[str, Any, float]]:
        """``(outcome, value, seconds)`` per task, in order: outcome ``"ok"`` (value is the
        return value), ``"timeout"`` or ``"error"`` (value is the exception)."""
        if not self._slots:
            raise RuntimeError("the grader pool is closed")
        try:
            return self._run(fn, tasks, timeout_s)
        except BaseException:  # e.g. Ctrl-C: no task of this call may outlive it
            for i, slot in enumerate(self._slots):
                if slot.task is not None:
                    slot.task = None
                    self._replace(i)
            raise

    def _run(
        self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], timeout_s: float
    ) -> list[tuple[str, Any, float]]:
        results: list[tuple[str, Any, float] | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        while True:
            for slot in self._slots:
                self._poll_ready(slot)
                if slot.ready is None and slot.task is None and queue:
                    slot.index = queue.popleft()
                    slot.started = time.monotonic()
                    slot.task = slot.executor.submit(fn, *tasks[slot.index])
            busy = [s for s in self._slots if s.task is not None]
            if not busy and not queue:
                break
            starting = [s.ready for s in self._slots if s.ready is not None]
            now = time.monotonic()
            next_deadline = min((s.started + timeout_s for s in busy), default=now + 1.0)
            wait(
                [s.task for s in busy if s.task] + starting,
                timeout=max(0.0, next_deadline - now),
                return_when=FIRST_COMPLETED,
            )
            for i, slot in enumerate(self._slots):
                if slot.task is None:
                    continue
                elapsed = time.monotonic() - slot.started
                if slot.task.done():
                    results[slot.index] = self._collect(slot.task, elapsed)
                    slot.task = None
                    if isinstance(results[slot.index][1], BrokenProcessPool):  # type: ignore[index]
                        self._replace(i)  # the worker died (e.g. a segfault in a C extension)
                elif elapsed >= timeout_s:
                    results[slot.index] = ("timeout", None, elapsed)
                    self._replace(i)  # stuck where the soft timer cannot reach
        return [r for r in results if r is not None]

    def _poll_ready(self, slot: _Slot) -> None:
        if slot.ready is None:
            return
        if not slot.ready.done():
            if time.monotonic() - slot.created > _STARTUP_TIMEOUT_S:
                raise RuntimeError(f"grader worker did not start in {_STARTUP_TIMEOUT_S:.0f} s")
            return
        error = slot.ready.exception()
        slot.ready = None
        if error is not None:
            raise RuntimeError(f"grader worker failed to start: {error!r}") from error

    def _collect(self, future: Future[Any], elapsed: float) -> tuple[str, Any, float]:
        error = future.exception()
        if error is None:
            return ("ok", future.result(), elapsed)
        if isinstance(error, _SoftTimeout):
            return ("timeout", None, elapsed)
        return ("error", error, elapsed)

    def _replace(self, i: int) -> None:
        self._slots[i].kill()
        self._slots[i] = _Slot(self._context, self._memory_mb)
        self.restarts += 1

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has started (imports done)."""
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            if slot.ready is not None:
                slot.ready.result(timeout=max(0.0, deadline - time.monotonic()))
                self._poll_ready(slot)

    def close(self) -> None:
        for slot in self._slots:
            if slot.task is not None and not slot.task.done():
                slot.kill()
            else:
                slot.executor.shutdown(wait=True, cancel_futures=True)
        self._slots = []
