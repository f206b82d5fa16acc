"""Conversion streams: its peak memory does not grow with the number of layers.

Runs benchmarks/conversion_memory.py at a small scale (the recorded multi-GB run is in
benchmarks/results/conversion_memory.json): the same model at 2 and 8 layers, each converter
in a fresh process, peak anonymous memory above the start level.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "conversion_memory", ROOT / "benchmarks" / "conversion_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_is_independent_of_depth(bench, tmp_path: Path) -> None:
    rows = bench.run([2, 8], hidden=256, experts=8, moe_ffn=768, workdir=tmp_path)
    by = {(r["direction"], r["layers"]): r for r in rows}
    for direction in ("hf-to-megatron", "megatron-to-hf"):
        shallow, deep = by[(direction, 2)], by[(direction, 8)]
        layer, bucket = deep["layer_bytes"], deep["bucket_bytes"]
        assert deep["checkpoint_bytes"] > 3 * shallow["checkpoint_bytes"]
        # 6 more layers add (much) less than one layer of peak memory ...
        growth = deep["peak_anon_above_start"] - shallow["peak_anon_above_start"]
        assert growth < 0.5 * layer, (direction, growth, layer)
        # ... and the peak is a layer's working set (tensor + its fused / split copy) + bucket
        assert deep["peak_anon_above_start"] < 2 * layer + bucket, (direction, deep)
