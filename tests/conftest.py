"""Shared test setup: ``@pytest.mark.gpu`` tests skip (with the reason shown) without CUDA."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device visible")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
