"""Known prompt-dataset formats: which columns hold the prompt and the gold answer.

A user can point ``data.train`` at a hub name or a local copy of a well-known math set and get
the right columns, instruction and gold normalisation without spelling them out. Lookup is by
name, hub name or path (``.../evaluation_suite/aime``, ``openai/gsm8k``); explicit
``prompt_key`` / ``answer_key`` always win over a format's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from megarl.data.answers import extract_boxed, gold_answers
from megarl.errors import UserError

# The instruction the R1-Zero-style math recipes append to a bare problem.
BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def gold_from_solution(raw: Any) -> tuple[str, ...]:
    """MATH: the gold answer is the last ``\\boxed{}`` of the worked solution."""
    if extract_boxed(str(raw)) is None:
        raise UserError("the solution has no \\boxed{} answer; is the answer key the solution?")
    return gold_answers(raw)


def gold_after_hashes(raw: Any) -> tuple[str, ...]:
    """GSM8K: the solution ends in ``#### N``; the gold answer is N."""
    if "####" not in str(raw):
        raise UserError("the solution has no '#### <answer>' line; is the answer key the solution?")
    return gold_answers(raw)


@dataclass(frozen=True)
class DatasetFormat:
    """Where a dataset keeps its prompt and answer, and how to read the gold answer.

    ``prompt_key`` / ``answer_key`` may be dotted paths into nested columns
    (``reward_model.ground_truth``). ``aliases`` are the hub names and folder names the format is
    recognised by; ``hub_config`` is the hub configuration to load (GSM8K's ``main``).
    """

    name: str
    prompt_key: str
    answer_key: str
    instruction: str | None = None
    gold: Callable[[Any], tuple[str, ...]] = gold_answers
    aliases: tuple[str, ...] = ()
    hub_config: str | None = None


def _eval_set(name: str, *aliases: str) -> DatasetFormat:
    return DatasetFormat(name, "problem", "answer", BOXED_INSTRUCTION, gold_answers,
                         (f"evaluation_suite/{name}", *aliases))


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        # Its prompts already carry their own instruction ("... Answer: $Answer").
        DatasetFormat("dapo_math_17k", "prompt", "reward_model.ground_truth", None,
                      gold_answers, ("BytedTsinghua-SIA/DAPO-Math-17k", "DAPO-Math-17k")),
        DatasetFormat("competition_math", "problem", "solution", BOXED_INSTRUCTION,
                      gold_from_solution, ("hendrycks/competition_math",
                                           "DigitalLearningGmbH/MATH-lighteval",
                                           "MATH-lighteval")),
        DatasetFormat("gsm8k", "question", "answer", BOXED_INSTRUCTION, gold_after_hashes,
                      ("openai/gsm8k",), hub_config="main"),
        # The offline suite of the "Understanding R1-Zero-like training" study (../shared/data).
        _eval_set("aime", "aime24"),
        _eval_set("amc", "amc23"),
        _eval_set("math", "math500", "MATH-500", "HuggingFaceH4/MATH-500"),
        _eval_set("minerva"),
        _eval_set("olympiad_bench", "olympiadbench"),
        DatasetFormat("gsm_8k", "problem", "answer", BOXED_INSTRUCTION, gold_answers,
                      ("train/gsm_8k",)),
    )
}

_BY_ALIAS: dict[str, DatasetFormat] = {
    alias.lower(): f for f in FORMATS.values() for alias in (f.name, *f.aliases)
}


def get_format(name: str) -> DatasetFormat:
    """The format called ``name`` (or one of its aliases); UserError listing the known ones."""
    found = _BY_ALIAS.get(name.strip().rstrip("/").lower())
    if found is None:
        raise UserError(f"format {name!r} is unknown; known: {', '.join(FORMATS)}")
    return found


def find_format(source: str, split: str | None = None) -> DatasetFormat | None:
    """The known format of a hub name or path, most specific match first; None if unknown.

    ``split`` helps with a folder of several splits: ``evaluation_suite`` + ``aime`` is AIME.
    """
    for candidate in _candidates(source, split):
        found = _BY_ALIAS.get(candidate.lower())
        if found is not None:
            return found
    return None


def _candidates(source: str, split: str | None) -> list[str]:
    text = source.strip().rstrip("/")
    parts = PurePath(text).parts
    out = [text]
    if _hub_like(text):  # "lighteval/MATH" is not MATH-500: hub names match only in full
        return out
    if len(parts) >= 2:
        out.append("/".join(parts[-2:]))
    if parts:
        out += [parts[-1], PurePath(parts[-1]).stem]
        if split:
            out += [f"{parts[-1]}/{split}", split]
    return out


def _hub_like(text: str) -> bool:
    """``owner/name`` or ``name`` that is not on disk: a hub name rather than a path."""
    return (
        text.count("/") <= 1
        and not text.startswith(("/", ".", "~"))
        and not Path(text).expanduser().exists()
    )
