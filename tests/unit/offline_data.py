"""Where the tests find the offline benchmark data (see ../shared/data/README.md).

The data is a shared test asset, never copied into the repository: tests load it by path
relative to the checkout and skip, with the reason shown, where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = (Path(__file__).resolve().parents[2] / "../shared/data").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data not found at {DATA}")
