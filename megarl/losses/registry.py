"""The policy-loss registry: one decorated function per objective, with typed hyperparameters.

A loss is registered with its hyperparameters (default, type, allowed range) so that configs are
validated before a run starts, with one-line errors that name the field (``algo.params.eps_low``)
and the allowed values. The same function may be registered under several names with different
defaults (``grpo`` / ``dapo`` are one PPO-clip objective with different bounds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from megarl.errors import ConfigError

AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a loss: its default, its type and the values it may take.

    `low`/`high` bound numbers (`*_open` makes a bound strict); `optional` admits None;
    `choices` restricts strings.
    """

    default: Any
    kind: type
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        elif self.kind is bool:
            text = "true or false"
        else:
            name = {float: "a number", int: "an integer"}.get(self.kind, self.kind.__name__)
            lo = "" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
            hi = "" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
            if lo and hi:
                text = f"{name} in {lo}, {hi}"
            elif lo:
                text = f"{name} {'>' if self.low_open else '>='} {self.low:g}"
            elif hi:
                text = f"{name} {'<' if self.high_open else '<='} {self.high:g}"
            else:
                text = name
        return text + (" or null" if self.optional else "")

    def coerce(self, field_name: str, value: Any) -> Any:
        """Return `value` converted to this parameter's type, or raise a ConfigError."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(field_name, value, f"must be {self.allowed()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(field_name, value, f"must be {self.allowed()}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ConfigError(field_name, value, f"must be {self.allowed()}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, str):  # YAML may hand us "inf"
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(field_name, value, f"must be {self.allowed()}") from None
            else:
                raise ConfigError(field_name, value, f"must be {self.allowed()}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(field_name, value, f"must be {self.allowed()}")
            value = int(value)
        else:
            value = float(value)
        if math.isnan(value):
            raise ConfigError(field_name, value, f"must be {self.allowed()}")
        too_low = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        too_high = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        if too_low or too_high:
            raise ConfigError(field_name, value, f"must be {self.allowed()}")
        return value


def eps_low(default: float = 0.2) -> Hyper:
    return Hyper(default, float, "lower clip: ratio bound 1 - eps_low", low=0.0, high=1.0,
                 high_open=True)


def eps_high(default: float = 0.2) -> Hyper:
    return Hyper(default, float, "upper clip: ratio bound 1 + eps_high (inf: no upper clip)",
                 low=0.0)


def dual_clip_c() -> Hyper:
    return Hyper(None, float, "dual clip (Ye et al. 2020): zero gradient for A<0 and w > c",
                 low=1.0, low_open=True, optional=True)


LossLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered policy loss: `fn(batch, **params) -> LossTerms` and its metadata."""

    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Hyper]
    default_agg: str
    level: LossLevel
    summary: str
    check: Callable[[dict[str, Any], str], None] | None = field(default=None, repr=False)

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter name -> default value."""
        return {k: h.default for k, h in self.params.items()}


POLICY_LOSSES: dict[str, PolicyLossSpec] = {}


def register_policy_loss(
    name: str,
    *,
    params: Mapping[str, Hyper],
    summary: str,
    level: LossLevel = "token",
    default_agg: str = "token-mean",
    check: Callable[[dict[str, Any], str], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as policy loss `name` (a function may carry several names)."""
    if default_agg not in AGG_MODES:
        raise ValueError(f"{name}: default_agg {default_agg!r} not in {AGG_MODES}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} registered twice")
        POLICY_LOSSES[name] = PolicyLossSpec(name, fn, dict(params), default_agg, level,
                                             summary, check)
        return fn

    return decorate


def get_policy_loss(name: str, field_name: str = "algo.loss") -> PolicyLossSpec:
    """The spec of loss `name`, or a ConfigError listing the known names."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), POLICY_LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted(POLICY_LOSSES))
        raise ConfigError(field_name, name, f"unknown policy loss{hint}; known: {known}") from None


def validate_loss_params(
    name: str, params: Mapping[str, Any] | None = None, field: str = "algo.params"
) -> dict[str, Any]:
    """Defaults of loss `name` merged with `params`, type-checked and range-checked.

    Raises ConfigError (one line, naming e.g. ``algo.params.eps_low``) for an unknown loss,
    an unknown hyperparameter, a wrong type or an impossible value.
    """
    spec = get_policy_loss(name)
    merged = spec.defaults
    for key, value in (params or {}).items():
        if key not in spec.params:
            import difflib

            close = difflib.get_close_matches(key, spec.params, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(spec.params) or "none"
            raise ConfigError(f"{field}.{key}", value,
                              f"not a hyperparameter of loss {name!r}; {hint}allowed: {known}")
        merged[key] = spec.params[key].coerce(f"{field}.{key}", value)
    if spec.check is not None:
        spec.check(merged, field)
    return merged
