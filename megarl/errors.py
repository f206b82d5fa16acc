"""User-facing errors.

A `UserError` is a mistake in what the user asked for (a config key, a value, a file): the CLI
prints its one-line message and exits with status 2, never a traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A one-line, actionable error about user input."""


class ConfigError(UserError):
    """A config field is unknown, of the wrong type or out of range.

    The message names the field, the value given and what is allowed, e.g.
    ``algo.eps_low=1.5: must be in [0, 1)``.
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")


class Short:
    """A value whose repr is cut to one short line (for error messages); equal to the value."""

    def __init__(self, value: object, limit: int = 60) -> None:
        self.value, self.limit = value, limit

    def __repr__(self) -> str:
        text = repr(self.value)
        return text if len(text) <= self.limit else text[: self.limit - 3] + "..."

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, Short) else other)

    __hash__ = None  # type: ignore[assignment]


class RunStopped(UserError):
    """The run stopped itself rather than train on, or save, a policy that is not finite.

    One line naming the step, what was not finite and what to do; no checkpoint is written for
    that step, so ``checkpoint.resume=auto`` continues from the newest intact one.
    """
