"""A quiet start-up: library warnings go to the debug log, one line says what is missing.

Importing megatron-core and building a model prints a dozen warnings that are no news to a
megarl user (Transformer Engine / Apex missing, each fallback announced by the module that takes
it, GPTModel and async-save deprecations, Mimo being experimental, torch's own deprecations
hit by megatron). `quiet_libraries`, called by the CLI before megatron is imported, sends them
to the ``megarl.libraries`` logger at DEBUG level; in their place, the first time a library
speaks, one ``note:`` line (rank 0 only) names the optional backends that are missing and what
that means. A run that stops before megatron is imported (a bad config) prints no note.

Errors stay visible: a library's log records at ERROR and above still print, warnings raised
by megarl's own code (or the user's) print as before, and ``-W error`` still raises. Set
``MEGARL_LOG_LEVEL=debug`` to see everything that was demoted.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TextIO

LOG = logging.getLogger("megarl.libraries")
LEVEL_ENV = "MEGARL_LOG_LEVEL"
# Packages whose warnings (issued from their own files) are demoted to the debug log.
LIBRARIES = ("megatron", "apex", "transformer_engine", "torch", "nvidia_resiliency_ext")
# Their loggers (the root of each tree), and torch's that megatron's import sets off.
LIBRARY_LOGGERS = ("megatron", "apex", "transformer_engine", "nvidia_resiliency_ext",
                   "torch.utils.cpp_extension")

_installed = False
_note: list[tuple[str, TextIO]] = []  # the note still to print, and where


def quiet_libraries(*, note: bool = True, stream: TextIO | None = None) -> None:
    """Demote the libraries' start-up warnings to DEBUG; the first of them prints the backends
    note instead (on rank 0, when ``note``). Idempotent; call before megatron is imported."""
    global _installed
    stream = stream or sys.stderr
    configure_logging(stream)
    text = backends_note()
    _note.clear()
    if note and text and _rank() == 0:
        _note.append((text, stream))
    if _installed:
        return
    _installed = True
    roots = _library_roots()
    original = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, file: TextIO | None = None,
                    line: str | None = None) -> None:  # fmt: skip
        if file is None and _under(filename, roots):
            _print_note()
            LOG.debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    handler = _Demote(stream)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False


def configure_logging(stream: TextIO | None = None) -> None:
    """megarl's loggers print to ``stream`` (stderr) from ``$MEGARL_LOG_LEVEL`` (default
    warning) up, message only."""
    logger = logging.getLogger("megarl")
    if logger.handlers:
        return
    name = os.environ.get(LEVEL_ENV, "warning").strip().upper()
    level = logging.getLevelName(name)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else logging.WARNING)
    logger.propagate = False


def backends_note() -> str | None:
    """One line naming the missing optional backends and what megatron-core does instead;
    None when Transformer Engine and Apex are both installed."""
    te, apex = _installed_package("transformer_engine"), _installed_package("apex")
    if te and apex:
        return None
    if not te:
        missing = "Transformer Engine and Apex are" if not apex else "Transformer Engine is"
        return (f"note: {missing} not installed: megatron-core runs its local PyTorch layers, "
                "norms and optimizer (fine on CPU, slower on GPUs, no context parallelism); "
                "pip install 'megarl[te]' for the fused kernels")
    return ("note: Apex is not installed: megatron-core uses PyTorch's optimizer and "
            "multi-tensor fallbacks (slightly slower on GPUs)")


class _Demote(logging.Handler):
    """A library's records below ERROR go to `LOG` at DEBUG; ERROR and above print."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                self.stream.write(f"{record.levelname} {record.name}: {message}\n")
                self.stream.flush()
            else:
                _print_note()
                LOG.debug("%s %s: %s", record.levelname, record.name, message)
        except Exception:  # logging must never raise
            self.handleError(record)


def _print_note() -> None:
    while _note:
        text, stream = _note.pop()
        print(text, file=stream, flush=True)


def _library_roots() -> tuple[str, ...]:
    roots = []
    for name in LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        for location in spec.submodule_search_locations or []:
            roots.append(str(Path(location).resolve()) + os.sep)
    return tuple(roots)


def _under(filename: str, roots: tuple[str, ...]) -> bool:
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(roots)


def _installed_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
