"""Config files: YAML read safely (duplicate keys and alias bombs refused), dotted overrides,
and typed construction of the config dataclasses with one-line errors."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from megarl.config_fields import alts, one_line, suggest
from megarl.errors import ConfigError, Short, UserError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; duplicate keys and non-mappings are errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the config "
                        "as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _TooLarge as e:
        raise UserError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML: {one_line(e)}") from None
    except RecursionError:
        raise UserError(f"{p}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), data, "a config file must hold a mapping of sections")
    return data


def parse_scalar(text: str) -> Any:
    """An override value, parsed as YAML (``8`` -> int, ``1e-6`` -> float, ``null`` -> None)."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _TooLarge:
        raise
    except (yaml.YAMLError, RecursionError):
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in nested ``data``, creating mappings on the way."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("override", override, "expected KEY=VALUE, e.g. algo.loss=up_gspo")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(where, child, f"is not a section, cannot set {key}")
        node = child
    try:
        node[leaf] = parse_scalar(raw)
    except _TooLarge as e:
        raise ConfigError(key, Short(raw), str(e)) from None


# --------------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------------


def build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "config", data, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = suggest(str(key), names, prefix)
            allowed = f"unknown key{hint}; allowed: {', '.join(names)}"
            raise ConfigError(path, Short(value), allowed)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against type ``tp`` (and converted: int -> float, tuple -> list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], path)
            except ConfigError as e:
                raise ConfigError(path, value, f"{e.allowed} or null") from None
        for a in inner:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(path, value, f"must be {' or '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(path, value, f"must be one of {alts(args)}{suggest(value, args)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, value, f"must be {_describe(tp)}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "must be a mapping")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}.{k}", v, "keys must be strings")
            out[k] = _coerce(v, args[1], f"{path}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, value, "must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    raise ConfigError(path, value, f"must be {_describe(tp)}")


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is Literal:
        return f"one of {alts(typing.get_args(tp))}"
    names = {bool: "a bool", int: "an int", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


# A config is a few hundred values; aliases (``*a``) repeat their anchor's content, and a
# "billion laughs" document of 1.4 KB expands into hundreds of millions of values when the
# config is copied or saved. Documents that expand past this many values are refused.
MAX_YAML_VALUES = 100_000


class _TooLarge(yaml.YAMLError):
    """A YAML document that expands past `MAX_YAML_VALUES`, or contains itself."""


def _expanded_size(root: yaml.Node) -> int:
    """The values (scalars, lists, mappings) of the document with every alias expanded, counted
    over its distinct nodes (a shared node adds its size each time it appears), so a document
    is refused before it is built; raises `_TooLarge` past `MAX_YAML_VALUES`."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes on the current path: an alias to one is recursive
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            open_.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
            if size > MAX_YAML_VALUES:
                raise _TooLarge(f"the YAML expands to more than {MAX_YAML_VALUES:,} values "
                                "(an alias repeats its anchor's content); refused")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            raise _TooLarge("a YAML alias refers to a node that contains it (a recursive "
                            "document); refused")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-6`` as a float (YAML 1.2), rejects duplicate keys and refuses
    documents whose aliases expand past `MAX_YAML_VALUES` values."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
