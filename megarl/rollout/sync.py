"""Megatron -> rollout engine weight sync, streamed in buckets of a configured size.

The model leaves Megatron as `(hf_name, full tensor)` pairs from
`megarl.megatron.weights.export_hf_weights` (`Policy.hf_weights`; the map of `megarl.convert`;
TP / expert-TP all-gather on the ranks that hold a tensor, then one broadcast from its pipeline /
expert owner), so no rank ever materialises the whole model: the sync holds one bucket plus the
tensor being gathered. There is no vocabulary padding to strip (megarl never pads it:
docs/conversion.md). Export is collective; every rank calls `sync_weights` with its stream, and
ranks with an engine load the buckets as they fill. This module never imports megatron.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from torch import Tensor

from megarl.errors import ConfigError
from megarl.rollout.engine import RolloutEngine

Pair = tuple[str, Tensor]


def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets(pairs: Iterable[Pair], bucket_bytes: int) -> Iterator[list[Pair]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor travels alone)."""
    if bucket_bytes < 1:
        raise ConfigError("rollout.sync_bucket_mb", bucket_bytes, "must be > 0")
    group: list[Pair] = []
    size = 0
    for name, tensor in pairs:
        n = nbytes(tensor)
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, tensor))
        size += n
    if group:
        yield group


def sync_weights(
    weights: Iterable[Pair],
    engine: RolloutEngine | None,
    *,
    bucket_bytes: int = 512 << 20,
) -> dict[str, float]:
    """Push the model's `weights` (``export_hf_weights(models, hf_config)``: collective, so every
    rank passes its stream) into `engine` (None on ranks without one); returns ``sync/*``
    metrics.

    The engine wakes its weights, loads the whole stream in ONE `update_weights` call (vLLM's
    layer-wise reload must see every tensor of a layer in one call), then wakes its KV cache.
    The stream gathers a bucket, hands its tensors over and drops them before gathering the
    next: the sync holds at most one bucket plus the tensor that overflowed it.
    """
    start = time.perf_counter()
    stats = {"bytes": 0, "tensors": 0, "buckets": 0, "largest": 0}

    def stream() -> Iterator[Pair]:
        for group in buckets(weights, bucket_bytes):
            size = sum(nbytes(t) for _, t in group)
            stats["bytes"] += size
            stats["tensors"] += len(group)
            stats["buckets"] += 1
            stats["largest"] = max(stats["largest"], size)
            group.reverse()
            while group:  # the consumer holds the only reference once a pair is handed over
                yield group.pop()

    pairs = stream()
    if engine is not None:
        engine.wake_up(["weights"])
        engine.update_weights(pairs)
    left = sum(1 for _ in pairs)  # export is collective: every rank runs it to the end
    if left:
        raise RuntimeError(f"the rollout engine's update_weights left {left} tensors unread")
    if engine is not None:
        engine.wake_up(["kv_cache"])
    return {
        "sync/seconds": time.perf_counter() - start,
        "sync/bytes": float(stats["bytes"]),
        "sync/tensors": float(stats["tensors"]),
        "sync/buckets": float(stats["buckets"]),
        "sync/largest_bucket_bytes": float(stats["largest"]),
    }
