"""How a batch of sequences is cut: over the data-parallel ranks, then into micro-batches.

Two modes, chosen by the trainer config:

- **a fixed count** (``trainer.micro_batch_size`` sequences per micro-batch): each DP rank takes a
  contiguous share of the batch and cuts it into groups of near-equal sequence counts;
- **a token budget** (``trainer.max_tokens_per_micro_batch``): the sequences are first spread over
  the DP ranks so that their token totals are balanced (the longest-processing-time greedy:
  longest first, each to the rank with the fewest tokens so far; Graham 1969, within 4/3 of the
  best split), then each rank packs its share first-fit decreasing into rows of at most the
  budget. A sequence longer than the budget travels alone in a row of its own.

Pipeline and expert-parallel schedules need the same number of micro-batches on every rank of a
step. Every rank holds the whole batch, so every rank computes every DP rank's cut from the same
lengths and takes the largest count: the ranks agree without exchanging a message. A rank with
fewer groups splits its fullest ones, and when no group has two sequences left to split it adds
empty groups, which the caller fills with a padding micro-batch that trains nothing.

The loss does not depend on the cut: its normalisers are global (`megarl.losses.aggregation`).

Everything here works on lengths and returns indices into the batch, so it is pure and cheap.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

PADDING_TOKENS = 2  # the sequence of a padding micro-batch (two tokens: one label)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_multiples(tp: int, cp: int, sequence_parallel: bool) -> tuple[int, int]:
    """``(seq_multiple, row_multiple)``: context parallelism cuts every sequence into 2cp chunks;
    sequence parallelism splits the row over the TP ranks."""
    seq = 2 * cp if cp > 1 else 1
    return seq, seq * (tp if sequence_parallel else 1)


def contiguous_shares(n: int, parts: int) -> list[list[int]]:
    """``parts`` contiguous, equal shares of ``range(n)`` (``parts`` must divide ``n``)."""
    if n % parts:
        raise ValueError(f"{n} samples do not split over {parts} DP ranks")
    per = n // parts
    return [list(range(p * per, (p + 1) * per)) for p in range(parts)]


def balanced_shares(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` shares of the batch with near-equal token totals (each index sorted).

    Longest first, each to the share with the fewest tokens so far (ties: the lowest share,
    then the lowest index), so every rank computes the same shares. Needs ``len >= parts``;
    every share then gets one sequence at least.
    """
    if len(lengths) < parts:
        raise ValueError(f"{len(lengths)} samples cannot give each of {parts} DP ranks one")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, p) for p in range(parts)]
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        total, p = heapq.heappop(heap)
        shares[p].append(i)
        heapq.heappush(heap, (total + lengths[i], p))
    return [sorted(share) for share in shares]


def count_groups(indices: Sequence[int], count: int) -> list[list[int]]:
    """``indices`` in order, cut into ``count`` contiguous groups of near-equal size."""
    if not 1 <= count <= len(indices):
        raise ValueError(f"num_micro_batches={count} must be in [1, {len(indices)}] "
                         "(one sample at least per micro-batch)")
    bounds = [round(k * len(indices) / count) for k in range(count + 1)]
    return [list(indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def budget_groups(lengths: Sequence[int], indices: Sequence[int],
                  capacity: int) -> list[list[int]]:  # fmt: skip
    """``indices`` packed first-fit decreasing into groups of at most ``capacity`` tokens
    (``lengths[i]`` tokens each); a sequence over the capacity gets a group of its own."""
    if capacity < 1:
        raise ValueError(f"max_tokens={capacity} must be >= 1")
    groups: list[list[int]] = []
    used: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for g, tokens in enumerate(used):
            if tokens + lengths[i] <= capacity:
                groups[g].append(i)
                used[g] += lengths[i]
                break
        else:
            groups.append([i])
            used.append(lengths[i])
    return groups


def split_to_count(groups: list[list[int]], lengths: Sequence[int],
                   count: int) -> list[list[int]]:  # fmt: skip
    """``groups`` made exactly ``count`` long: the fullest group with two sequences or more is
    split in two (balanced, longest first) until there are enough; empty groups (padding)
    make up the rest. Splitting never makes a group fuller, so a budget still holds."""
    if len(groups) > count:
        raise ValueError(f"{len(groups)} groups cannot become {count}")
    out = [list(g) for g in groups]
    while len(out) < count:
        splittable = [g for g in out if len(g) > 1]
        if not splittable:
            out.extend([] for _ in range(count - len(out)))
            break
        fullest = max(splittable, key=lambda g: sum(lengths[i] for i in g))
        halves = balanced_shares([lengths[i] for i in fullest], 2)
        out.remove(fullest)
        out.extend([fullest[k] for k in half] for half in halves)
    return out


@dataclass(frozen=True)
class Cut:
    """One batch's cut: every DP rank's share and micro-batches (indices into the batch; an
    empty micro-batch is padding) and the row length of each micro-batch."""

    shares: list[list[int]]
    micro_batches: list[list[list[int]]]  # [dp rank][micro-batch] -> indices
    row_lengths: list[list[int]]  # [dp rank][micro-batch] -> tokens in the packed row
    fixed_shape: bool = False  # the schedule pads every row to the longest

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0])

    def stats(self, lengths: Sequence[int]) -> dict[str, float]:
        """``batch/*`` metrics: micro-batches, the largest row, the fraction of row tokens that
        are padding, and the DP imbalance (the busiest rank's row tokens over the mean)."""
        longest = max(max(rows) for rows in self.row_lengths)
        per_rank = [longest * len(rows) if self.fixed_shape else sum(rows)
                    for rows in self.row_lengths]
        real = sum(lengths)
        total = sum(per_rank)
        return {
            "batch/micro_batches": float(self.num_micro_batches),
            "batch/row_tokens/max": float(longest),
            "batch/padding_frac": 1.0 - real / total if total else 0.0,
            "batch/dp_imbalance": max(per_rank) / (total / len(per_rank)) if total else 1.0,
        }


def cut_batch(
    lengths: Sequence[int],
    dp: int,
    *,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    seq_multiple: int = 1,
    row_multiple: int = 1,
    count_multiple: int = 1,
    fixed_shape: bool = False,
) -> Cut:
    """The cut of a batch with these sequence lengths (exactly one of `micro_batch_size` and
    `max_tokens`). ``seq_multiple`` pads every sequence, ``row_multiple`` every row (CP and SP),
    ``count_multiple`` rounds the micro-batch count up (the interleaved schedule wants a multiple
    of pp), and ``fixed_shape`` says the schedule pads every row to the longest (the interleaved
    schedule's one shape; `Cut.stats` counts that padding).

    ``max_tokens`` bounds a whole packed row; it is rounded down to a multiple of
    ``row_multiple`` so the row's own padding keeps within it.
    """
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size or max_tokens")
    padded = [round_up(n, seq_multiple) for n in lengths]
    if micro_batch_size is not None:
        shares = contiguous_shares(len(lengths), dp)
        count = max(1, math.ceil(len(shares[0]) / micro_batch_size))
        per_rank = [count_groups(share, count) for share in shares]
    else:
        capacity = max_tokens // row_multiple * row_multiple
        if capacity < 1:
            raise ValueError(f"max_tokens={max_tokens} is below one row's multiple "
                             f"{row_multiple} (tp x 2cp tokens)")
        shares = balanced_shares(padded, dp)
        per_rank = [budget_groups(padded, share, capacity) for share in shares]
        count = round_up(max(len(groups) for groups in per_rank), count_multiple)
        per_rank = [split_to_count(groups, padded, count) for groups in per_rank]
    padding = round_up(PADDING_TOKENS, seq_multiple)
    rows = [[round_up(sum(padded[i] for i in g) if g else padding, row_multiple) for g in groups]
            for groups in per_rank]
    return Cut(shares=shares, micro_batches=per_rank, row_lengths=rows, fixed_shape=fixed_shape)
