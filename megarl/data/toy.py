"""Synthetic verifiable tasks with their own character tokenizer (``toy:<task>``).

They need no download and no pretrained model: a tiny model built from scratch learns them in
minutes on a CPU, which makes them the quickstart's task and the trainer's learning tests.
Problem ``i`` of a task is a pure function of ``(seed, i)``, so a run's data position is one
integer and a resumed run sees exactly the problems it would have seen.

The answer of a response is its leading run of answer characters (digits, a minus sign):
``"7<eos>"``, ``"7 ..."`` and ``"7+..."`` all answer 7, and ``"73"`` answers 73. A model that
has not learned to stop still gets credit for the right number, so the reward is dense enough
for a randomly initialised policy to find (about 1 in 30 samples at the start).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from megarl.errors import UserError

TOY_PREFIX = "toy:"


class CharTokenizer:
    """A character-level tokenizer over a fixed alphabet; id 0 is padding, id 1 the EOS."""

    pad_token = "<pad>"
    eos_token = "<eos>"

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.id_of = {c: i + 2 for i, c in enumerate(alphabet)}
        self.pad_token_id, self.eos_token_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self.id_of[c] for c in text]
        except KeyError as e:
            raise UserError(f"toy tokenizer: character {e.args[0]!r} is not in its alphabet "
                            f"{self.alphabet!r}") from None

    def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id and stop_at_eos:
                break
            if i >= 2 and i - 2 < len(self.alphabet):
                out.append(self.alphabet[i - 2])
        return "".join(out)


@dataclass(frozen=True)
class ToyProblem:
    index: int
    prompt: str
    answer: str | tuple[str, ...]  # the answer, or every accepted answer


@dataclass(frozen=True)
class ArithmeticTask:
    """``a+b=`` (and ``-`` / ``*`` when listed in `ops`) with operands in ``[0, max_operand]``."""

    max_operand: int = 3
    ops: str = "+"
    name: str = "arithmetic"

    def problem(self, seed: int, index: int) -> ToyProblem:
        rng = random.Random(f"{self.name}:{seed}:{index}")
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return ToyProblem(index, f"{a}{op}{b}=", str(value))


@dataclass(frozen=True)
class DigitSumTask:
    """``s=``: any number of `min_digits` to `max_digits` digits (no leading zero) whose digits
    sum to ``s``, for ``s`` in ``[min_sum, max_sum]``. A prompt has many correct answers (9 for
    ``s = 3``, 73 for ``s = 12`` with 2-3 digits), several tokens each, so the diversity of a
    policy's answers, its entropy and pass@k mean something: the exploration testbed of
    docs/experiments.md, where the arithmetic tasks have one answer per prompt."""

    min_sum: int = 3
    max_sum: int = 12
    min_digits: int = 2
    max_digits: int = 3
    name: str = "digitsum"

    def answers(self, total: int) -> tuple[str, ...]:
        low, high = 10 ** (self.min_digits - 1), 10 ** self.max_digits
        return tuple(str(v) for v in range(low, high) if sum(map(int, str(v))) == total)

    def problem(self, seed: int, index: int) -> ToyProblem:
        rng = random.Random(f"{self.name}:{seed}:{index}")
        total = rng.randint(self.min_sum, self.max_sum)
        return ToyProblem(index, f"{total}=", self.answers(total))


ALPHABET = "0123456789+-*= "
TASKS: dict[str, ArithmeticTask | DigitSumTask] = {
    "arithmetic": ArithmeticTask(),
    "arithmetic-hard": ArithmeticTask(max_operand=9, ops="+-*", name="arithmetic-hard"),
    "digitsum": DigitSumTask(),
}


def is_toy(source: str | None) -> bool:
    return bool(source) and source.startswith(TOY_PREFIX)


def toy_task(source: str, field: str = "data.train") -> ArithmeticTask | DigitSumTask:
    name = source.removeprefix(TOY_PREFIX)
    if name not in TASKS:
        raise UserError(f"{field}={source!r}: unknown toy task; known: "
                        + ", ".join(TOY_PREFIX + t for t in TASKS))
    return TASKS[name]


def toy_tokenizer(source: str) -> CharTokenizer:
    toy_task(source, "model.tokenizer")
    return CharTokenizer(ALPHABET)


def leading_answer(text: str) -> str | None:
    """The response's leading number (an optional minus and digits), or None."""
    text = text.lstrip(" ")
    end = 1 if text[:1] == "-" else 0
    while end < len(text) and text[end].isdigit():
        end += 1
    number = text[:end]
    return number if number.strip("-") else None


def toy_reward(response: str, answer: str | Sequence[str]) -> float:
    """1.0 when the leading number is the answer (or one of the accepted answers: a dataset's
    `~megarl.data.prompts.PromptItem` carries them all)."""
    golds = (answer,) if isinstance(answer, str) else tuple(answer)
    return 1.0 if leading_answer(response) in golds else 0.0


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample from: its token ids, text and gold answer."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    answer: str | tuple[str, ...]


class ToySource:
    """Problems ``0, 1, 2, ...`` of a toy task: the position is the whole resumable state."""

    def __init__(self, source: str, tokenizer: CharTokenizer, seed: int) -> None:
        self.task, self.tokenizer, self.seed = toy_task(source), tokenizer, seed
        self.position = 0
        self.num_dropped = 0

    def next_batch(self, n: int) -> list[Prompt]:
        out = []
        for index in range(self.position, self.position + n):
            p = self.task.problem(self.seed, index)
            out.append(Prompt(index, self.tokenizer.encode(p.prompt), p.prompt, p.answer))
        self.position += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
