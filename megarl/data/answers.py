"""Final-answer extraction from model text and normalisation of dataset gold answers.

Both run in the trainer process on untrusted or messy text, so they are plain linear scans:
no regex backtracking, no recursion, no ``eval``.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from megarl.errors import UserError

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A stringified list longer than this is treated as plain text rather than parsed.
_MAX_LITERAL_CHARS = 10_000
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_ZERO = re.compile(r"(-?\d+)\.0+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_SEPARATOR = re.compile(r"\s*(?:,|,?\s*and)\s*")
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_WORD = re.compile(r"(?<!\\)\b[A-Za-z]{2,}\b")  # an English word, not a \command
# No nested braces inside the argument: a linear scan, no backtracking.
_TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textit|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|~")
_ANSWER_LABEL = re.compile(r"answer[ \t]*:", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in ``text``.

    The last box is the model's final answer. ``None`` when there is none or when the last one
    is unbalanced (a response cut off mid-answer must not fall back to an earlier, intermediate
    box). Escaped braces ``\\{`` ``\\}`` do not count towards the balance.
    """
    # One position per command, re-searched only when that candidate is rejected: linear time
    # even for \boxedx repeated 10,000 times.
    found = {command: text.rfind(command) for command in _BOX_COMMANDS}
    while True:
        command = max(found, key=lambda c: found[c])
        start = found[command]
        if start < 0:
            return None
        after = start + len(command)
        if after < len(text) and text[after].isalpha():  # e.g. \boxedfoo: another command
            found[command] = text.rfind(command, 0, start)
            continue
        return _box_content(text, after)


def final_answer(text: str) -> str | None:
    """The answer a response commits to: its last ``\\boxed{}`` (see `extract_boxed`) or, in a
    response with no box at all, the rest of its last ``Answer:`` line (case-insensitive), the
    form DAPO-Math-17k's prompts ask for ("The last line of your response should be of the
    form Answer: $Answer"); ``$...$`` around it is dropped. None when there is neither."""
    if any(command in text for command in _BOX_COMMANDS):
        return extract_boxed(text)
    labels = list(_ANSWER_LABEL.finditer(text))
    if not labels:
        return None
    last = labels[-1]
    line_end = text.find("\n", last.end())
    line = text[last.end() : line_end if line_end >= 0 else len(text)]
    return _strip_math_wrappers(line.strip().rstrip(".").strip()) or None


def _box_content(text: str, pos: int) -> str | None:
    """Argument of a box command whose name ends just before ``pos``."""
    n = len(text)
    i = pos
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        if i == pos:  # \boxed5 or \boxed$: not a form models use for answers
            return None
        j = i
        while j < n and not text[j].isspace() and text[j] != "$":
            j += 1
        token = text[i:j].rstrip(".,;")
        return token or None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # skip the escaped character: \{ \} \\ never open or close a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def gold_answers(raw: Any) -> tuple[str, ...]:
    """All accepted answers of a dataset row, normalised, in order, without duplicates.

    Minerva stores several *alternative* forms of one answer (``['-\\frac{1}{3}\\n', '-1/3']``),
    so a list means "any of these", never a tuple answer. The first is the canonical one.
    """
    out: list[str] = []
    for item in _as_items(raw):
        norm = _normalise_scalar(item)
        if norm and norm not in out:
            out.append(norm)
    if not out:
        raise UserError(f"gold answer {_short(raw)} is empty; every row needs a non-empty answer")
    return tuple(out)


def normalise_gold(raw: Any) -> str:
    """One gold answer as a LaTeX string math-verify can parse inside ``\\boxed{}``.

    Handles AMC floats (``142.0`` -> ``"142"``), Minerva / OlympiadBench lists or stringified
    lists (``"['9.6\\n']"`` -> ``"9.6"``), GSM8K ``"#### 18"`` and ``$...$`` wrappers. A list
    with several alternatives gives the first; use `gold_answers` to keep them all.
    """
    return gold_answers(raw)[0]


def is_prose(gold: str) -> bool:
    """Whether a normalised gold is prose around formulas rather than one formula.

    OlympiadBench has answers such as ``$f(x)=a x+b$, where $b$ is an arbitrary integer, and
    ...``: math-verify would grade only a fragment of it (its last formula, ``\\mho(a)=0``, is
    "equal" to the answer ``0``), so such a gold is compared as text (`text_key`) instead.
    """
    parts = _UNESCAPED_DOLLAR.split(gold)
    return len(parts) >= 3 and any(_WORD.search(text) for text in parts[0::2])


def text_key(text: str) -> str:
    """``text`` reduced for a textual comparison: math delimiters, ``\\text{}`` wrappers, LaTeX
    spaces, white space and case removed (``"$f(x)=a x+b$, \\text{where} ..."`` ->
    ``"f(x)=ax+b,where..."``), and a final full stop."""
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _LATEX_SPACE.sub("", _UNESCAPED_DOLLAR.sub("", text))
    return "".join(text.split()).casefold().rstrip(".")


def _as_items(raw: Any) -> list[Any]:
    if raw is None:
        raise UserError("gold answer is missing (None); every row needs an answer")
    if isinstance(raw, str):
        parsed = _string_list(raw)
        return parsed if parsed is not None else [raw]
    if isinstance(raw, Sequence) or _is_array(raw):
        return list(raw)  # each item is checked by _normalise_scalar
    return [raw]


def _is_array(raw: Any) -> bool:
    return hasattr(raw, "tolist") and getattr(raw, "ndim", 0) == 1


def _string_list(raw: str) -> list[str] | None:
    """``"['9.6\\n']"`` -> its strings; anything else (``"[-2, 7]"``: an interval) -> None."""
    s = raw.strip()
    if not (s.startswith("[") and s.endswith("]") and len(s) <= _MAX_LITERAL_CHARS):
        return None
    if "'" not in s and '"' not in s:
        return None
    try:
        value = ast.literal_eval(s)  # literals only: never runs code; bounded length above
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _normalise_scalar(item: Any) -> str:
    if isinstance(item, bool):
        raise UserError(f"gold answer {item!r} is a bool; answers must be strings or numbers")
    if isinstance(item, int):
        return str(item)
    if isinstance(item, float):
        if not math.isfinite(item):
            raise UserError(f"gold answer {item!r} is not finite; fix the dataset row")
        if item.is_integer():
            return str(int(item))
        text = repr(item)  # the shortest round-tripping form, without an exponent
        return format(Decimal(text), "f") if "e" in text else text
    if not isinstance(item, str):
        if hasattr(item, "item"):  # numpy scalar
            return _normalise_scalar(item.item())
        raise UserError(f"gold answer {_short(item)}: expected a string or a number")
    return _normalise_text(item)


def _normalise_text(s: str) -> str:
    s = s.strip()
    if "####" in s:  # GSM8K solution text: the answer follows the last ####
        s = s.rsplit("####", 1)[1].strip()
    if "\\boxed" in s or "\\fbox" in s:
        boxed = extract_boxed(s)
        if boxed is not None:
            s = boxed.strip()
    s = _strip_math_wrappers(_join_math_segments(s))
    if len(_UNESCAPED_DOLLAR.findall(s)) % 2:  # "$221,$8$": an odd '$' delimits nothing
        s = _UNESCAPED_DOLLAR.sub("", s).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _TRAILING_ZERO.fullmatch(s)
    if m:
        s = m.group(1)
    return s


def _join_math_segments(s: str) -> str:
    """``"$69$,$84$"`` (OlympiadBench multi-answers) -> ``"69, 84"``; ``"$x$."`` -> ``"x"``.

    Only when nothing but commas or "and" sits between the math segments: prose such as
    ``"$f(x)=ax+b$, where $b$ is ..."`` is left alone.
    """
    parts = _UNESCAPED_DOLLAR.split(s)
    if len(parts) < 3 or len(parts) % 2 == 0:  # no segment, or an odd number of '$'
        return s
    texts, maths = parts[0::2], parts[1::2]
    if texts[0].strip() or texts[-1].strip() not in ("", "."):
        return s
    if not all(_SEPARATOR.fullmatch(t) for t in texts[1:-1]) or not all(m.strip() for m in maths):
        return s
    return ", ".join(m.strip() for m in maths)


def _strip_math_wrappers(s: str) -> str:
    changed = True
    while changed:
        changed = False
        for left, right in _MATH_WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                inner = s[len(left) : len(s) - len(right)]
                if left == "$" and "$" in inner:  # "$a$ and $b$": not one wrapper
                    continue
                s, changed = inner.strip(), True
                break
    return s


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
