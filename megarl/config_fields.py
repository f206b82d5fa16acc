"""Checks and messages shared by every config section: a positive int, a list of the allowed
values, a "did you mean" and a one-line rendering of an exception."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from megarl.errors import ConfigError


def positive(path: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(path, value, "must be an int >= 1")


def alts(options: Sequence[Any]) -> str:
    return ", ".join(repr(o) for o in options)


def suggest(word: Any, options: Sequence[Any], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest option, or nothing."""
    if not isinstance(word, str):
        return ""
    strings = [o for o in options if isinstance(o, str)]
    match = difflib.get_close_matches(word, strings, n=1, cutoff=0.6)
    if not match:
        return ""
    full = f"{prefix}.{match[0]}" if prefix else match[0]
    return f" (did you mean {full!r}?)"


def one_line(text: object) -> str:
    return " ".join(str(text).split())
