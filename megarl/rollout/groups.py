"""Sampling spread over the engine groups of an SPMD job.

Every rank holds the same prompt list; engine group ``g`` (``rollout.tp`` consecutive ranks)
samples its contiguous share with its own seed, and the whole batch, in prompt order, ends on
every rank. The trainer's rollout and the evaluation use the same path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from megarl.rollout.engine import Rollout, RolloutEngine, SamplingParams


def generate_across_groups(engine: RolloutEngine, prompts: Sequence[Sequence[int]],
                           params_for: Callable[[int], SamplingParams], *, rank: int,
                           world: int, tp: int) -> list[Rollout]:  # fmt: skip
    """Rollouts of ``prompts`` (one each), group ``g`` sampling with ``params_for(g)``."""
    group, groups = rank // tp, world // tp
    share = math.ceil(len(prompts) / groups)
    mine = list(prompts[group * share:(group + 1) * share])
    engine.wake_up()
    out = engine.generate(mine, params_for(group)).rollouts if mine else []
    if groups == 1:
        return out
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, out)
    return [r for r_, part in enumerate(parts) if r_ % tp == 0 for r in part]
