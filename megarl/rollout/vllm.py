"""The production rollout engine: ``vllm.LLM`` colocated in the training ranks (vLLM 0.33).

Written against vLLM 0.33.0's source (``entrypoints/llm.py``, ``engine/arg_utils.py``,
``model_executor/model_loader/reload/``, ``distributed/aux_output_connector/``):

- **Colocated.** ``distributed_executor_backend="external_launcher"`` runs the engine in this
  process on the torch.distributed world megatron already initialised. vLLM lays the world out
  as ExternalDP x TP, so every block of ``tp`` consecutive ranks is one independent engine
  (`engine_group`): its ranks must get the same prompts and the same seed. Every rank of the
  world builds the engine at the same time (construction runs world collectives).
- **R3.** ``enable_return_routed_experts=True``: each finished ``CompletionOutput`` carries
  ``routed_experts`` ``[len(prompt) + len(response) - 1, num_hidden_layers, topk]`` (uint8 up
  to 256 experts), one row per token fed forward, whole-model expert ids. `rollout_from_output`
  keeps the MoE layers' columns and checks the row count. vLLM 0.33 requires prefix caching ON
  for route capture (cached blocks' routes come from its routing store), so it stays on.
- **Sleep mode.** Weights and KV cache are released while megatron trains (level 2: the weights
  are discarded, not copied to host memory, because every wake is followed by a full sync).
  A sync wakes the weights, streams the new tensors in, resets the prefix cache (a cached block
  was computed by the old weights) and only then wakes the KV cache, so the two never hold
  memory at the same time.
- **Refit.** ``collective_rpc("reload_weights", weights_iterator=...)`` loads HF-named full
  tensors with layer-wise reprocessing into the original storage (CUDA graphs stay valid, and
  any MoE kernel layout is rebuilt). All buckets of one sync go through ONE call: layer-wise
  reload finalises a layer when the call ends, and a layer split across calls would be
  finalised half-loaded. ``moe_backend="triton"`` is the default (refit-friendly; FlashInfer
  backends repack expert weights).
- **Log-probs.** ``logprobs_mode="processed_logprobs"``, ``logprobs=0``: the sampled token's
  log-prob after temperature, as the trainer computes it. (With top-p / top-k on, vLLM's
  processed log-probs are renormalised over the kept tokens while the trainer's are not:
  ``rollout/logp_abs_diff_*`` shows the gap.)

vLLM needs a GPU; this module imports without it and fails with the extra to install when used.
The pieces that need no GPU (arguments, sampling, output conversion, route alignment, the sync
protocol) are unit-tested in tests/unit/test_rollout_vllm.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from megarl.config import Config, MoeBackend
from megarl.errors import ConfigError, UserError
from megarl.rollout.engine import Rollout, RolloutBatch, SamplingParams, route_dtype

MOE_BACKENDS: tuple[str, ...] = get_args(MoeBackend)
SLEEP_LEVEL = 2  # discard weights and KV cache; the next sync rewrites every weight


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UserError("rollout.engine='vllm' needs vLLM: pip install 'megarl[vllm]' "
                        "(or use rollout.engine='hf')") from None
    return vllm


@dataclass(frozen=True)
class VLLMOptions:
    """What megarl sets on ``vllm.LLM`` (the rest stays vLLM's default)."""

    tp: int = 1
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.6
    max_model_len: int | None = None
    enforce_eager: bool = False
    moe_backend: str = "triton"
    seed: int = 0  # the world's base seed; engine group g uses seed + g
    load_format: str = "dummy"  # the first sync writes every weight: skip reading them twice
    routed_experts: bool = True  # R3

    @classmethod
    def from_config(cls, config: Config, *, seed: int) -> VLLMOptions:
        """The options of a run: ``rollout.*``, the model's dtype, and routes iff R3."""
        r = config.rollout
        return cls(tp=r.tp, dtype=config.model.dtype,
                   gpu_memory_utilization=r.gpu_memory_utilization,
                   max_model_len=r.max_prompt_len + r.max_response_len,
                   enforce_eager=r.enforce_eager, moe_backend=r.moe_backend, seed=seed,
                   routed_experts=config.model.replay_mode() == "r3")

    def check(self) -> None:
        if self.tp < 1:
            raise ConfigError("rollout.tp", self.tp, "must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("rollout.gpu_memory_utilization", self.gpu_memory_utilization,
                              "must be in (0, 1]")
        if self.moe_backend not in MOE_BACKENDS:
            raise ConfigError("rollout.moe_backend", self.moe_backend,
                              f"must be one of {', '.join(MOE_BACKENDS)}")


def engine_group(rank: int, world_size: int, tp: int) -> tuple[int, int]:
    """``(group, num_groups)``: vLLM's external launcher makes ranks ``[g*tp, (g+1)*tp)`` one
    engine (its ExternalDP x TP layout)."""
    if tp < 1 or world_size % tp:
        raise ConfigError("rollout.tp", tp, f"must divide the world size {world_size}")
    return rank // tp, world_size // tp


def llm_kwargs(model: str, options: VLLMOptions, *, rank: int, world_size: int,
               max_logprobs: int = 0) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of ``vllm.LLM`` for a colocated engine on this rank."""
    options.check()
    group, _ = engine_group(rank, world_size, options.tp)
    kwargs: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": options.tp,
        "distributed_executor_backend": "external_launcher",
        "dtype": options.dtype,
        "seed": options.seed + group,  # same within an engine, different across engines
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enforce_eager": options.enforce_eager,
        "enable_sleep_mode": True,
        "enable_prefix_caching": True,  # required by route capture in vLLM 0.33
        "enable_return_routed_experts": options.routed_experts,
        "moe_backend": options.moe_backend,
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": max_logprobs,
        "load_format": options.load_format,
        "disable_custom_all_reduce": True,  # as verl's colocated engine: NCCL all-reduce only
    }
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    return kwargs


def check_launch_environment(env: dict[str, str] | os._Environ = os.environ) -> None:
    """What the external launcher needs from the environment, checked before vLLM starts."""
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise UserError(f"rollout.engine='vllm' runs inside the training ranks: launch with "
                        f"torchrun or srun (missing {', '.join(missing)} in the environment)")
    if env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise UserError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset) for the colocated "
                        "vLLM engine")
    if "expandable_segments:True" in env.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        raise UserError("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which vLLM's "
                        "sleep-mode allocator cannot use: remove it")


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams``: one sample, the sampled token's log-prob,
    token ids only (no detokenisation)."""
    sampling.check()
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else 0,  # 0 = off in vLLM 0.33
        "max_tokens": sampling.max_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": sampling.ignore_eos,
        "seed": sampling.seed,
        "logprobs": 0,  # the sampled token only
        "detokenize": False,
    }


def aligned_routes(
    routes: Any, num_tokens: int, moe_layers: Sequence[bool], num_experts: int,
    prompt_routes: Any = None,
) -> Tensor:  # fmt: skip
    """An engine's routes as our contract's ``[num_tokens - 1, moe_layers, topk]``.

    ``routes`` covers every token fed forward (vLLM 0.33), or only the response part when a
    newer engine returns the prompt's rows separately in ``prompt_routes`` (then they are
    concatenated, prompt first). The layer axis may hold every hidden layer (vLLM: dense
    layers' columns are meaningless) or only the MoE layers.
    """
    parts = [np.asarray(routes)] if prompt_routes is None else \
        [np.asarray(prompt_routes), np.asarray(routes)]
    if any(p.ndim != 3 for p in parts):
        raise UserError(f"routed_experts: expected [tokens, layers, topk], got shapes "
                        f"{[p.shape for p in parts]}")
    rows = np.concatenate(parts, axis=0)
    want = num_tokens - 1
    if rows.shape[0] != want:
        raise UserError(f"routed_experts: {rows.shape[0]} rows for {num_tokens} tokens, "
                        f"expected {want} (one per token fed forward). With prefix caching "
                        "on, check the vLLM version's route capture")
    moe = [i for i, m in enumerate(moe_layers) if m]
    if rows.shape[1] == len(moe_layers) and len(moe) != len(moe_layers):
        rows = rows[:, moe]
    elif rows.shape[1] != len(moe):
        raise UserError(f"routed_experts: {rows.shape[1]} layers, the model has "
                        f"{len(moe_layers)} layers of which {len(moe)} are MoE")
    out = torch.from_numpy(np.ascontiguousarray(rows).astype(np.int64))
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= num_experts):
        raise UserError(f"routed_experts: ids outside [0, {num_experts})")
    return out.to(route_dtype(num_experts))


def rollout_from_output(output: Any, moe_layers: Sequence[bool] | None,
                        num_experts: int) -> Rollout:  # fmt: skip
    """A finished ``vllm.RequestOutput`` (one completion) as a `Rollout`."""
    completion = output.outputs[0]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {getattr(output, 'request_id', '?')} ended with "
                           f"finish_reason={completion.finish_reason!r}")
    prompt = torch.tensor(list(output.prompt_token_ids), dtype=torch.long)
    response = torch.tensor(list(completion.token_ids), dtype=torch.long)
    if completion.logprobs is None or len(completion.logprobs) != len(response):
        raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams.logprobs=0)")
    logprobs = torch.tensor([float(step[int(t)].logprob) for step, t in
                             zip(completion.logprobs, response, strict=True)],
                            dtype=torch.float32)  # fmt: skip
    routes = None
    if moe_layers is not None and any(moe_layers):
        raw = getattr(completion, "routed_experts", None)
        if raw is None:
            raise RuntimeError("vLLM returned no routed_experts: build the engine with "
                               "enable_return_routed_experts=True")
        routes = aligned_routes(raw, len(prompt) + len(response), moe_layers, num_experts,
                                getattr(output, "prompt_routed_experts", None))
    return Rollout(prompt_ids=prompt, response_ids=response, logprobs=logprobs,
                   finish_reason=completion.finish_reason, routed_experts=routes)


class VLLMEngine:
    """``vllm.LLM`` as a `RolloutEngine` (one per rank; ``tp`` ranks form one engine).

    `llm` is for callers that build the ``vllm.LLM`` themselves; by default it is built from
    `llm_kwargs` (every rank of the world at once) and put to sleep until the first sync.
    """

    def __init__(self, model: str, options: VLLMOptions, *, moe_layers: Sequence[bool] | None,
                 num_experts: int, llm: Any = None) -> None:  # fmt: skip
        self.options = options
        self.moe_layers = tuple(moe_layers) if moe_layers is not None else None
        self.num_experts = num_experts
        self._vllm = None
        if llm is None:
            self._vllm = import_vllm()
            check_launch_environment()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
            world = dist.get_world_size() if dist.is_initialized() else \
                int(os.environ["WORLD_SIZE"])
            llm = self._vllm.LLM(**llm_kwargs(model, options, rank=rank, world_size=world))
        self.llm = llm
        self.awake = {"weights": True, "kv_cache": True}
        self.sleep()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        if not all(self.awake.values()):
            raise RuntimeError("generate on a sleeping vLLM engine: sync the weights first")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        params = self._sampling_params(sampling)
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts],
                                    params, use_tqdm=False)
        return RolloutBatch([rollout_from_output(o, self.moe_layers, self.num_experts)
                             for o in outputs])

    def _sampling_params(self, sampling: SamplingParams) -> Any:
        kwargs = sampling_kwargs(sampling)
        if self._vllm is None:  # an injected LLM: hand over the plain arguments
            return kwargs
        return self._vllm.SamplingParams(**kwargs)

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Load HF-named full tensors (vLLM shards them for its TP) in ONE layer-wise reload,
        then drop the prefix cache computed by the old weights; returns bytes loaded."""
        if not self.awake["weights"]:
            raise RuntimeError("update_weights on sleeping weights: wake_up(['weights']) first")
        counted = _Counted(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(counted)})
        if not self.llm.reset_prefix_cache():  # also resets the routing store (R3)
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update "
                               "(requests still running?)")
        return counted.bytes

    def sleep(self) -> None:
        if any(self.awake.values()):
            self.llm.sleep(level=SLEEP_LEVEL)
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake ``tags`` (``weights``, ``kv_cache``; all when None). A sync wakes the weights,
        loads them, then wakes the KV cache, so both never hold memory while the other loads."""
        tags = list(self.awake) if tags is None else list(tags)
        unknown = set(tags) - set(self.awake)
        if unknown:
            raise ValueError(f"wake_up: unknown tags {sorted(unknown)}; use weights, kv_cache")
        todo = [t for t in tags if not self.awake[t]]
        if todo:
            self.llm.wake_up(tags=todo)
            for t in todo:
                self.awake[t] = True


class _Counted:
    """Iterates `pairs` once, counting the bytes that went through."""

    def __init__(self, pairs: Iterable[tuple[str, Tensor]]) -> None:
        self.pairs, self.bytes = pairs, 0

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in self.pairs:
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
