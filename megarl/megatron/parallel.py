"""Process groups for one run: TP / PP / CP / EP / ETP / DP from a `ParallelConfig`.

One call, ``initialize_parallel``, validates the layout against the world size and the model
(``ParallelConfig.resolve`` / ``check_model`` give one-line errors naming the field), creates
megatron-core's groups and seeds every RNG. Axes, in megatron-core's order "tp-cp-ep-dp-pp":
tensor (tp) varies fastest, pipeline (pp) slowest. Expert layers re-fold the same ranks as
etp x ep x edp per pipeline stage.

Conventions used across megarl/megatron/:
- the *data-parallel group* is DP without CP: ranks that hold different samples. CP ranks of
  one DP rank hold slices of the same samples; global counts are therefore all-reduced over
  DP only (a sample is counted once, not once per CP slice).
- every rank of a DP replica (all TP / PP / CP ranks) receives the same micro-batches.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megarl.layout import ModelFacts, ParallelConfig, RankCoordinates


def init_process_group(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Start torch.distributed from torchrun's environment (a single process without it)."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def check_layout(parallel: ParallelConfig, facts: ModelFacts, world_size: int) -> ParallelConfig:
    """The resolved layout (dp filled in) or a one-line `ConfigError` naming the field: the
    rules are `ParallelConfig`'s (config validation and ``megarl plan`` apply the same)."""
    parallel.check()
    resolved = parallel.resolve(world_size)
    resolved.check_model(facts)
    return resolved


def initialize_parallel(
    parallel: ParallelConfig, facts: ModelFacts, seed: int | None = 42
) -> RankCoordinates:
    """Validate, (re)create megatron-core's process groups and seed all RNGs.

    ``seed=None`` skips seeding (megatron's RNG tracker needs CUDA): for offline tools that only
    build a model to read its structure.

    torch.distributed must be up (``init_process_group``). Calling it again replaces the
    previous groups (tests loop over layouts in one launch).
    """
    if not dist.is_initialized():
        raise RuntimeError("call megarl.megatron.parallel.init_process_group() first")
    resolved = check_layout(parallel, facts, dist.get_world_size())
    destroy_parallel()
    ps.initialize_model_parallel(**megatron_sizes(resolved))
    if seed is not None:
        seed_everything(seed)
    return current_layout(resolved)


def megatron_sizes(parallel: ParallelConfig) -> dict[str, int | None]:
    """The layout in megatron-core's keyword names (shared by the groups and the model config)."""
    return {
        "tensor_model_parallel_size": parallel.tp,
        "pipeline_model_parallel_size": parallel.pp,
        "virtual_pipeline_model_parallel_size": parallel.vpp if (parallel.vpp or 1) > 1 else None,
        "context_parallel_size": parallel.cp,
        "expert_model_parallel_size": parallel.ep,
        "expert_tensor_parallel_size": parallel.expert_tp,
    }


def current_layout(resolved: ParallelConfig) -> RankCoordinates:
    """This rank's coordinates in `resolved` (`megarl.layout`), checked against the groups
    megatron-core just built: the layout arithmetic megarl plans with is megatron's own."""
    here = resolved.coordinates(dist.get_rank())
    megatron = {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "cp_rank": ps.get_context_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
    }
    ours = {k: getattr(here, k) for k in megatron}
    if ours != megatron:
        raise RuntimeError(f"rank {here.rank}: megarl.layout places it at {ours}, "
                           f"megatron-core at {megatron}")
    return here


def seed_everything(seed: int) -> None:
    """Python, torch and megatron's model-parallel RNG tracker (dropout, init under TP).

    The same seed on every rank: megatron offsets the TP / EP streams itself.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the router-replay registry between layouts."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def data_parallel_group() -> dist.ProcessGroup:
    """Ranks holding different samples (DP without CP); see the module docstring."""
    return ps.get_data_parallel_group(with_context_parallel=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
