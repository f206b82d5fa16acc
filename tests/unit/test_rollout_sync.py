"""Weight-sync buckets: bounded, ordered, complete (the Megatron side is in
tests/distributed/replay_cases.py, where every engine tensor is compared after a sync)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from megarl.errors import ConfigError
from megarl.rollout.sync import buckets


def stream(sizes):
    for i, n in enumerate(sizes):
        yield f"t{i}", torch.zeros(n, dtype=torch.float32)


def test_buckets_keep_order_and_size() -> None:
    sizes = [10, 20, 5, 100, 1, 1, 30]
    groups = list(buckets(stream(sizes), bucket_bytes=4 * 32))
    assert [n for g in groups for n, _ in g] == [f"t{i}" for i in range(len(sizes))]
    for g in groups:
        total = sum(t.numel() * 4 for _, t in g)
        assert total <= 128 or len(g) == 1  # an oversized tensor travels alone
    assert [len(g) for g in groups] == [2, 1, 1, 3]
    with pytest.raises(ConfigError, match="sync_bucket_mb"):
        list(buckets(stream([1]), 0))


def test_live_memory_is_bounded_by_the_bucket() -> None:
    """Tensors yielded by the export are released once their bucket is consumed: the bytes
    alive at any time never exceed one bucket plus one tensor."""
    alive = {"bytes": 0, "peak": 0}

    def tracked(sizes):
        for i, n in enumerate(sizes):
            t = torch.ones(n)
            alive["bytes"] += n * 4
            alive["peak"] = max(alive["peak"], alive["bytes"])
            weakref.finalize(t, lambda n=n: alive.__setitem__("bytes", alive["bytes"] - n * 4))
            yield f"t{i}", t
            del t

    bucket = 64 << 10
    sizes = [4096] * 200 + [30000] + [4096] * 50  # 16 KiB tensors, one of 117 KiB
    consumed = 0
    for group in buckets(tracked(sizes), bucket):
        consumed += len(group)
        del group
        gc.collect()
    assert consumed == len(sizes)
    assert alive["peak"] <= bucket + 30000 * 4, alive
    assert alive["bytes"] == 0
