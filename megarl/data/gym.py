"""reasoning-gym tasks as prompt sources and rewards (``reasoning_gym:<task>``).

reasoning-gym (Stojanovski et al., "REASONING GYM: Reasoning Environments for Reinforcement
Learning with Verifiable Rewards", arXiv:2505.24760) has ~100 seeded procedural generators,
each with its own scorer; verl and NeMo-RL users train on it for unlimited fresh problems at a
chosen difficulty. megarl reads it the same way:

* ``data.train: reasoning_gym:chain_sum`` streams problems ``0, 1, 2, ...`` of the generator
  (options in ``data.reasoning_gym.<task>``, e.g. ``{min_terms: 2, max_terms: 2}``); the
  position in the stream is the whole resumable state, like the toy tasks'.
* ``data.eval: [reasoning_gym:chain_sum]`` is the first ``eval.max_problems`` distinct
  held-out problems (default `EVAL_PROBLEMS`).
* **Held out by construction.** A problem's split is a pure function of its question text
  (`split_of`: a hash into ``[0, 1)``, held out below ``data.held_out_fraction``), so no
  question the policy trains on is ever evaluated, whatever the seeds, sizes or stream
  positions, and even on a small problem space where the generator repeats questions. The
  held-out stream uses ``data.reasoning_gym_seed``; the training stream a hash of that seed
  and ``trainer.seed`` (`stream_seed`), so runs with different seeds train on different
  problems and evaluate on the same benchmark.
* ``data.reward: reasoning_gym`` scores with the task's own ``score_answer`` on the
  response's answer (`extract_answer`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from megarl.data.answers import extract_boxed
from megarl.data.prompts import PromptItem, render_prompt, tokenise
from megarl.errors import ConfigError, UserError

GYM_PREFIX = "reasoning_gym:"
EVAL_PROBLEMS = 200  # a held-out benchmark's size when eval.max_problems is not set
# The generators are procedural: item i is a pure function of (seed, i); the size only bounds
# iteration, which megarl does not use.
_STREAM_SIZE = 2**31 - 1
_REPEATS_BEFORE_DONE = 20_000  # held-out draws with no new question: the split is exhausted
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def is_gym(source: str | None) -> bool:
    return bool(source) and source.startswith(GYM_PREFIX)


def _import_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("reasoning_gym:<task> data needs reasoning-gym: pip install -e "
                        "'.[example]' (or pip install reasoning-gym)") from None
    return reasoning_gym


def gym_task(source: str, field: str = "data.train") -> str:
    """The task name of ``reasoning_gym:<task>``; a one-line error for an unknown one."""
    name = source.removeprefix(GYM_PREFIX)
    known = _import_gym().factory.DATASETS
    if name not in known:
        from megarl.config_fields import suggest

        raise UserError(f"{field}={source!r}: unknown reasoning-gym task"
                        f"{suggest(name, list(known))}; e.g. reasoning_gym:chain_sum, "
                        "reasoning_gym:basic_arithmetic")
    return name


@cache
def _generator(task: str, seed: int, options: tuple[tuple[str, Any], ...]) -> Any:
    try:
        return _import_gym().create_dataset(task, seed=seed, size=_STREAM_SIZE,
                                            **dict(options))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"data.reasoning_gym.{task}", dict(options),
                          f"not valid options for this generator ({e})") from None


def generator(task: str, options: Mapping[str, Any], seed: int) -> Any:
    """The task's procedural dataset (cached: one per task, seed and options)."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                          for k, v in options.items()))
    return _generator(task, seed, frozen)


def stream_seed(base: int, split: str, trainer_seed: int) -> int:
    """The generator seed of a split's stream: ``base`` for the held-out problems, a 31-bit
    hash of ``(base, trainer_seed)`` for training. Not ``base + trainer_seed``: reasoning-gym's
    item ``i`` of seed ``s`` is drawn from ``Random(s + i)``, so neighbouring seeds would be one
    stream shifted by one problem, and two "seeds" of a run would train on the same data."""
    if split != "train":
        return base
    digest = hashlib.sha256(f"megarl-train:{base}:{trainer_seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def split_of(question: str, held_out_fraction: float) -> str:
    """``"test"`` for a held-out question, else ``"train"``: a hash of the text alone."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction else "train"


class GymGold(str):
    """A gold answer (the ``str`` every reward reads) that carries its reasoning-gym entry, for
    the task's own scorer (``data.reward: reasoning_gym``)."""

    task: str
    entry: Mapping[str, Any]
    options: Mapping[str, Any]

    def __new__(cls, task: str, entry: Mapping[str, Any],
                options: Mapping[str, Any]) -> GymGold:  # fmt: skip
        gold = super().__new__(cls, str(entry["answer"]))
        gold.task, gold.entry, gold.options = task, entry, options
        return gold

    def __reduce__(self) -> tuple[Any, ...]:
        return GymGold, (self.task, self.entry, self.options)


class GymSource:
    """One split of a reasoning-gym task, served like a `~megarl.data.prompts.PromptDataset`:
    ``next_batch(n)`` continues the stream (training), iteration gives the first ``limit``
    distinct problems (evaluation). Prompts over ``max_prompt_len`` tokens are skipped and
    counted in ``num_dropped``."""

    def __init__(self, source: str, tokenizer: Any, *, split: str, options: Mapping[str, Any],
                 seed: int, held_out_fraction: float, template: str, instruction: str | None,
                 max_prompt_len: int, limit: int | None = None,
                 field: str = "data.train") -> None:  # fmt: skip
        self.task = gym_task(source, field)
        self.name = source
        self.split, self.held_out_fraction = split, held_out_fraction
        self.tokenizer, self.template, self.instruction = tokenizer, template, instruction
        self.max_prompt_len, self.limit = max_prompt_len, limit
        self.options = dict(options)
        self._dataset = generator(self.task, options, seed)
        self.position = 0  # the next generator index to look at
        self.num_dropped = 0

    def _next(self) -> tuple[int, dict[str, Any]]:
        """The next generator item of this split (index, entry); a clear error where the split
        stays empty (a tiny problem space, or a fraction of 0 or 1)."""
        for _ in range(100_000):
            index, self.position = self.position, self.position + 1
            entry = self._dataset[index]
            if split_of(entry["question"], self.held_out_fraction) == self.split:
                return index, entry
        raise ConfigError("data.held_out_fraction", self.held_out_fraction,
                          f"leaves {self.name} no {self.split} problems in 100,000 draws; "
                          "choose a fraction in (0, 1) or a larger problem space")

    def _item(self, index: int, entry: Mapping[str, Any]) -> PromptItem | None:
        text = render_prompt(self.tokenizer, self.template, self.instruction, entry["question"])
        ids = tokenise(self.tokenizer, self.template, [text])[0]
        if len(ids) > self.max_prompt_len:
            self.num_dropped += 1
            return None
        gold = GymGold(self.task, entry, self.options)
        return PromptItem(index, list(ids), text, (gold,), self.name)

    def next_batch(self, n: int) -> list[PromptItem]:
        out: list[PromptItem] = []
        while len(out) < n:
            item = self._item(*self._next())
            if item is not None:
                out.append(item)
            elif self.num_dropped > 1000 and not out:
                raise ConfigError("rollout.max_prompt_len", self.max_prompt_len,
                                  f"drops every prompt of {self.name}; raise it")
        return out

    def __iter__(self) -> Iterator[PromptItem]:
        """The first ``limit`` distinct problems of the split, from the stream's start (all of
        them, when a small problem space holds fewer: `_REPEATS_BEFORE_DONE` draws in a row
        bring nothing new); does not move the training position."""
        saved, self.position = self.position, 0
        seen: set[str] = set()
        repeats = 0
        try:
            while len(seen) < (self.limit or EVAL_PROBLEMS) and repeats < _REPEATS_BEFORE_DONE:
                index, entry = self._next()
                if entry["question"] in seen:
                    repeats += 1
                    continue
                seen.add(entry["question"])
                repeats = 0
                item = self._item(index, entry)
                if item is not None:
                    yield item
        finally:
            self.position = saved

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise UserError(f"data state position={position!r}: expected an int >= 0 (the "
                            "checkpoint's data state is damaged)")
        self.position = position


def gym_source(source: str, tokenizer: Any, data: Any, *, split: str, seed: int,
               template: str, max_prompt_len: int, limit: int | None = None,
               field: str = "data.train") -> GymSource:  # fmt: skip
    """A `GymSource` from the ``data`` config section (`megarl.config.DataConfig`)."""
    task = source.removeprefix(GYM_PREFIX)
    return GymSource(source, tokenizer, split=split, options=data.reasoning_gym.get(task, {}),
                     seed=stream_seed(data.reasoning_gym_seed, split, seed),
                     held_out_fraction=data.held_out_fraction,
                     template=template, instruction=data.instruction,
                     max_prompt_len=max_prompt_len, limit=limit, field=field)


# --------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------


def extract_answer(response: str) -> str | None:
    """The answer a response gives, read as reasoning-gym's prompts ask for it and as
    math-verify reads free text: the last ``<answer>...</answer>``, else the last
    ``\\boxed{}``, else the last number in the text; None when there is none."""
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1].rstrip(".") if numbers else None


def gym_score(answer: str | None, gold: str) -> float:
    """The task's own ``score_answer`` of a response's answer (0 with no answer)."""
    if not isinstance(gold, GymGold):
        raise UserError("data.reward=reasoning_gym scores reasoning_gym:<task> data only; use "
                        "data.reward=math for other datasets")
    if answer is None:
        return 0.0
    # the scorer is the generator's own method (some read its options); the seed is not used
    scorer = generator(gold.task, gold.options, 0)
    return float(scorer.score_answer(answer, dict(gold.entry)))


def gym_rewards(responses: Sequence[str], golds: Sequence[Any]) -> tuple[list[float],
                                                                          dict[str, float]]:
    """Rewards for a batch and ``reward/no_answer`` (the fraction with nothing to score)."""
    answers = [extract_answer(r) for r in responses]
    rewards = [gym_score(a, g[0] if isinstance(g, tuple) else g)
               for a, g in zip(answers, golds, strict=True)]
    missing = sum(a is None for a in answers)
    return rewards, {"reward/no_answer": missing / max(len(responses), 1)}
