"""Run configuration: dataclasses, YAML loading, dotted overrides and validation.

A run is described by one YAML file whose top-level sections mirror the dataclasses below
(``model``, ``parallel``, ``rollout``, ``algo``, ``data``, ``trainer``, ``checkpoint``,
``logging``). Command-line overrides use dotted paths and YAML scalars::

    load_config("run.yaml", ["algo.loss=dapo", "algo.params.eps_high=0.28", "parallel.ep=8"])

Every mistake — an unknown key at any depth, a wrong type, a value out of range or a
combination that cannot run — raises one :class:`~megarl.errors.ConfigError` whose one-line
message names the field, the value and what is allowed.

Conventions: a *sequence* is one sampled response (``prompts_per_step * rollout.n_samples``
sequences per step); ``trainer.mini_batch_size`` and ``trainer.micro_batch_size`` count
sequences (the mini-batch globally, the micro-batch per data-parallel rank).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megarl.errors import ConfigError, Short, UserError
from megarl.hf_checks import check_hf_config

Dtype = Literal["float32", "bfloat16", "float16"]
Sink = Literal["console", "progress", "jsonl", "tensorboard", "wandb"]
# Routing replay: R3 replays the rollout engine's routes, R2 Megatron's own (recorded in the
# old-log-prob pass); YAML's bare `off` / `on` parse as booleans and mean "off" / "r3".
ReplayMode = Literal["r3", "r2", "off"]
# vLLM 0.33 MoE kernels that reload weights in place ("auto" lets vLLM pick).
MoeBackend = Literal["auto", "triton", "batched_triton", "flashinfer_trtllm", "flashinfer_cutlass",
                     "aiter"]

# Advantage estimators that compare a sample with the other samples of its prompt.
_GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The policy model.

    ``name_or_path`` is an HF hub name or a local directory holding ``config.json`` (and the
    weights unless ``random_init``). ``hf_config`` is an inline HF-style config: the whole
    config of a model built from scratch, or keys that override the loaded one.
    """

    name_or_path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # defaults to name_or_path
    random_init: bool = False
    dtype: Dtype = "bfloat16"
    routing_replay: ReplayMode | bool | None = None  # None = "r3" for MoE models, else "off"
    transformer_engine: bool | None = None  # None = use the TE spec when it imports
    # MoE experts of the local (non-TE) spec as grouped GEMMs instead of megatron's
    # SequentialMLP (megarl/megatron/experts.py); None = on whenever the TE spec is not used
    grouped_experts: bool | None = None
    recompute: Literal["none", "selective", "full"] = "none"
    # log-probs and entropy of the sampled tokens: "torch" (chunked), "triton" (the fused
    # kernels of megarl/megatron/fused_logprobs.py, CUDA), "auto" (triton on CUDA, torch
    # elsewhere); what each has been measured on: benchmarks/README.md
    logprob_kernel: Literal["torch", "triton", "auto"] = "torch"

    def check(self) -> None:
        if self.name_or_path is None and not self.hf_config:
            raise ConfigError(
                "model.name_or_path", None, "give an HF name/path or an inline model.hf_config"
            )
        if self.name_or_path is None and not self.random_init:
            raise ConfigError(
                "model.random_init", False, "must be true when there is no model.name_or_path"
            )
        if self.name_or_path is None and self.tokenizer is None:
            raise ConfigError(
                "model.tokenizer", None, "required when there is no model.name_or_path"
            )
        checkpoint = self.checkpoint_config()
        check_hf_config({**(checkpoint or {}), **self.hf_config}, self.hf_config,
                        complete=self.name_or_path is None or checkpoint is not None)

    def replay_mode(self, facts: ModelFacts | None = None) -> ReplayMode:
        """The routing replay mode: ``routing_replay`` with its shorthands resolved."""
        mode = self.routing_replay
        if mode is None:
            is_moe = (facts or self.facts()).is_moe
            return "off" if is_moe is False else "r3"
        if isinstance(mode, bool):
            return "r3" if mode else "off"
        return mode

    def checkpoint_config(self) -> dict[str, Any] | None:
        """The local checkpoint's config.json; None when there is none here."""
        if self.name_or_path is None:
            return None
        path = Path(self.name_or_path).expanduser() / "config.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path}: {_one_line(e)}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not an HF config (a JSON object of fields)")
        return data

    def known_config(self) -> dict[str, Any]:
        """The HF config as far as it is known offline: local config.json updated by hf_config."""
        return {**(self.checkpoint_config() or {}), **self.hf_config}

    def facts(self) -> ModelFacts:
        """Architecture numbers that constrain the parallel layout (None when unknown)."""
        return ModelFacts.from_hf(self.known_config())


@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers read from an HF config; None where the config does not say."""

    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_experts: int | None = None
    moe_router_topk: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    complete: bool = False  # a whole config (it names its model_type), not a few overrides

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelFacts:
        def first(*keys: str) -> int | None:
            for k in keys:
                v = hf.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
            return None

        heads = first("num_attention_heads")
        return cls(
            num_layers=first("num_hidden_layers"),
            num_attention_heads=heads,
            num_query_groups=first("num_key_value_heads") or heads,
            num_experts=first("num_experts", "num_local_experts", "n_routed_experts"),
            moe_router_topk=first("num_experts_per_tok"),
            hidden_size=first("hidden_size"),
            vocab_size=first("vocab_size"),
            max_position_embeddings=first("max_position_embeddings"),
            complete="model_type" in hf,
        )

    @property
    def is_moe(self) -> bool | None:
        """True/False when the config says; None when it is unknown."""
        if self.num_experts is not None:
            return self.num_experts > 0
        return False if self.complete else None


@dataclass
class ParallelConfig:
    """Megatron layout. ``tp*pp*cp*dp == world_size``; experts use ``etp*ep*edp*pp``.

    ``dp`` and ``world_size`` may be left out: ``dp`` is then computed at launch from the
    world size (``resolve``). ``etp`` defaults to ``tp`` (Megatron's rule) and
    ``sequence_parallel`` to ``tp > 1``. ``gpu_memory_gib`` is one GPU's memory as torch
    reports its total (H100 80GB: 79.1 GiB, H200: 139.8 GiB); only ``megarl plan`` reads it.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    dp: int | None = None
    world_size: int | None = None
    sequence_parallel: bool | None = None
    gpu_memory_gib: float = 79.1

    def check(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "etp", "vpp", "dp", "world_size"):
            _positive(f"parallel.{name}", getattr(self, name), allow_none=True)
        if not self.gpu_memory_gib > 0:
            raise ConfigError("parallel.gpu_memory_gib", self.gpu_memory_gib, "must be > 0")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel", True, "needs parallel.tp > 1")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise ConfigError("parallel.vpp", self.vpp, "needs parallel.pp > 1")
        if self.world_size is not None:
            self.check_world_size(self.world_size)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def data_parallel_size(self, world_size: int | None = None) -> int | None:
        """dp given, or computed from the world size; None when neither is known."""
        world = world_size if world_size is not None else self.world_size
        if self.dp is not None:
            return self.dp
        if world is None:
            return None
        return world // (self.tp * self.pp * self.cp)

    def check_world_size(self, world_size: int) -> int:
        """Check the layout against ``world_size`` and return the data-parallel size."""
        _positive("parallel.world_size", world_size)
        model = self.tp * self.pp * self.cp
        if self.dp is None and world_size % model:
            raise ConfigError(
                "parallel.world_size",
                world_size,
                f"must be a multiple of tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {model}",
            )
        dp = self.dp if self.dp is not None else world_size // model
        if model * dp != world_size:
            raise ConfigError(
                "parallel.dp",
                dp,
                f"tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{dp} = {model * dp} must equal "
                f"the world size {world_size}",
            )
        expert = self.ep * self.expert_tp
        if (self.tp * self.cp * dp) % expert:
            raise ConfigError(
                "parallel.ep",
                self.ep,
                f"ep*etp = {self.ep}*{self.expert_tp} must divide tp*cp*dp = "
                f"{self.tp}*{self.cp}*{dp} (the ranks of one pipeline stage)",
            )
        return dp

    def resolve(self, world_size: int) -> ParallelConfig:
        """A copy with ``world_size`` and ``dp`` filled in, checked."""
        if self.world_size is not None and self.world_size != world_size:
            raise ConfigError(
                "parallel.world_size",
                self.world_size,
                f"the job was launched with {world_size} processes",
            )
        dp = self.check_world_size(world_size)
        return dataclasses.replace(self, dp=dp, world_size=world_size)

    def check_model(self, facts: ModelFacts) -> None:
        """Constraints that need the model's architecture; unknown numbers are skipped."""
        if facts.num_attention_heads is not None and facts.num_attention_heads % self.tp:
            raise ConfigError(
                "parallel.tp",
                self.tp,
                f"must divide the model's {facts.num_attention_heads} attention heads",
            )
        if facts.num_query_groups is not None and facts.num_query_groups % self.tp:
            raise ConfigError(
                "parallel.tp",
                self.tp,
                f"must divide the model's {facts.num_query_groups} KV heads (query groups)",
            )
        stages = self.pp * (self.vpp or 1)
        if facts.num_layers is not None and facts.num_layers % stages:
            raise ConfigError(
                "parallel.pp",
                self.pp,
                f"pp*vpp = {stages} must divide the model's {facts.num_layers} layers",
            )
        if facts.is_moe is False and self.ep > 1:
            raise ConfigError("parallel.ep", self.ep, "must be 1 for a dense (non-MoE) model")
        if facts.num_experts and facts.num_experts % self.ep:
            raise ConfigError(
                "parallel.ep", self.ep, f"must divide the model's {facts.num_experts} experts"
            )
        if facts.vocab_size is not None and facts.vocab_size % self.tp:
            raise ConfigError(
                "parallel.tp", self.tp, f"must divide the vocabulary size {facts.vocab_size}"
            )
        if facts.is_moe and self.tp > 1 and not self.use_sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel", False,
                "must be true for MoE models with tp > 1 (megatron-core requires it in training)",
            )


@dataclass
class RolloutConfig:
    """Sampling: the engine and its settings. ``tp`` is the rollout engine's own TP size."""

    engine: Literal["hf", "vllm"] = "hf"
    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_prompt_len: int = 1024
    max_response_len: int = 2048
    stop: list[str] = field(default_factory=list)
    tp: int = 1
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = False
    # vLLM's MoE kernels (must support in-place reload): auto = triton on CUDA, the CPU's own
    moe_backend: MoeBackend = "auto"
    kv_cache_gib: float | None = None  # vLLM's KV cache; None: gpu_memory_utilization (CUDA),
    #                                    room for one step's sequences (CPU)
    sync_bucket_mb: float = 512  # weight sync: MiB gathered and loaded at a time

    def check(self) -> None:
        _positive("rollout.n_samples", self.n_samples)
        if not self.temperature > 0:
            raise ConfigError("rollout.temperature", self.temperature, "must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError("rollout.top_k", self.top_k, "must be -1 (off) or >= 1")
        _positive("rollout.max_prompt_len", self.max_prompt_len)
        _positive("rollout.max_response_len", self.max_response_len)
        _positive("rollout.tp", self.tp)
        if self.engine == "hf" and self.tp != 1:
            raise ConfigError("rollout.tp", self.tp, "must be 1 with rollout.engine='hf'")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                "rollout.gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]"
            )
        if not self.sync_bucket_mb > 0:
            raise ConfigError("rollout.sync_bucket_mb", self.sync_bucket_mb, "must be > 0")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError("rollout.kv_cache_gib", self.kv_cache_gib, "must be > 0 (or null)")

    @property
    def sync_bucket_bytes(self) -> int:
        return max(1, int(self.sync_bucket_mb * (1 << 20)))


@dataclass
class AlgoConfig:
    """The RL objective: policy loss (``megarl.losses``), advantages, KL, filtering.

    ``agg=None`` means the loss's own default aggregation; ``params`` are the loss's
    hyperparameters (missing ones take the loss's defaults, see ``resolved_params``).
    """

    loss: str = "up_gspo"
    agg: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    advantage: str = "grpo"
    kl_beta: float = 0.0
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4  # dynamic sampling: rollout rounds per step at most
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    # DAPO's soft overlong punishment (eq. 13): the last `overlong_buffer` tokens before
    # rollout.max_response_len cost up to `overlong_penalty` reward, linearly; 0 = off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0

    def check(self) -> None:
        from megarl.advantages import ADVANTAGE_ESTIMATORS
        from megarl.losses import AGG_MODES

        self.resolved_params()  # unknown loss / hyperparameter / range, from the loss library
        if self.agg is not None and self.agg not in AGG_MODES:
            raise ConfigError("algo.agg", self.agg, f"must be null or one of {_alts(AGG_MODES)}")
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            hint = _suggest(self.advantage, ADVANTAGE_ESTIMATORS)
            allowed = f"must be one of {_alts(ADVANTAGE_ESTIMATORS)}{hint}"
            raise ConfigError("algo.advantage", self.advantage, allowed)
        if self.kl_beta < 0:
            raise ConfigError("algo.kl_beta", self.kl_beta, "must be >= 0")
        if self.entropy_coef < 0:
            raise ConfigError("algo.entropy_coef", self.entropy_coef, "must be >= 0")
        _positive("algo.max_sampling_rounds", self.max_sampling_rounds)
        if self.overlong_buffer < 0:
            raise ConfigError("algo.overlong_buffer", self.overlong_buffer,
                              "must be >= 0 (0 = off)")
        if self.overlong_penalty < 0:
            raise ConfigError("algo.overlong_penalty", self.overlong_penalty, "must be >= 0")

    def resolved_params(self) -> dict[str, Any]:
        """The loss's defaults updated by ``params``, validated by the loss library."""
        from megarl.losses import validate_loss_params

        return validate_loss_params(self.loss, self.params, "algo.params")

    def resolved_agg(self) -> str:
        """``agg``, or the loss's default aggregation when ``agg`` is null."""
        from megarl.losses import POLICY_LOSSES

        return self.agg if self.agg is not None else POLICY_LOSSES[self.loss].default_agg


@dataclass
class DataConfig:
    """Prompts and rewards.

    ``train`` / ``eval`` name datasets: an HF hub name, a local path (``datasets``
    ``load_from_disk`` folder or json/parquet file) or ``toy:<task>`` for a built-in synthetic
    task with its own tokenizer.
    """

    train: str = "toy:arithmetic"
    split: str = "train"
    eval: list[str] = field(default_factory=list)
    prompt_key: str | None = None  # None = the known format's (megarl/data/formats.py)
    answer_key: str | None = None
    instruction: str | None = None  # appended to each prompt; None = the format's default
    template: Literal["chat", "plain"] = "chat"
    reward: Literal["math", "exact"] = "math"
    reward_workers: int = 4
    shuffle: bool = True
    # Keep only the data.train rows whose column (a dotted key reaches a nested one) holds one of
    # the listed values, e.g. MATH levels 3-5: {level: [Level 3, Level 4, Level 5]}; {} keeps
    # every row. Benchmarks (data.eval) are never filtered.
    train_filter: dict[str, list[str | int]] = field(default_factory=dict)

    def check(self) -> None:
        if not self.train:
            raise ConfigError("data.train", self.train, "must name a dataset")
        _positive("data.reward_workers", self.reward_workers)
        for column, values in self.train_filter.items():
            if not column or not values:
                raise ConfigError(f"data.train_filter.{column}", values,
                                  "list the values to keep (at least one)")
        if self.train_filter and self.train.startswith("toy:"):
            raise ConfigError("data.train_filter", self.train_filter,
                              f"filters dataset rows; the toy task {self.train} has none")


@dataclass
class TrainerConfig:
    """The optimisation loop. Batch sizes count sequences (see the module docstring)."""

    steps: int = 100
    prompts_per_step: int = 32
    mini_batch_size: int = 256
    micro_batch_size: int = 1
    epochs: int = 1
    lr: float = 1e-6
    lr_warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 42
    eval_every: int = 0  # 0 = never
    # updates in a row that may be skipped (non-finite gradients) or undone (a non-finite
    # policy after the update) before the run stops (megarl/megatron/update_guard.py)
    max_bad_updates: int = 3

    def check(self) -> None:
        for name in ("steps", "prompts_per_step", "mini_batch_size", "micro_batch_size"):
            _positive(f"trainer.{name}", getattr(self, name))
        _positive("trainer.epochs", self.epochs)
        _positive("trainer.max_bad_updates", self.max_bad_updates)
        if not self.lr > 0:
            raise ConfigError("trainer.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("trainer.min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        for name in ("lr_warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}", getattr(self, name), "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}", getattr(self, name), "must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("trainer.weight_decay", self.weight_decay, "must be >= 0")
        if not self.grad_clip >= 0:
            raise ConfigError("trainer.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")


@dataclass
class EvalConfig:
    """Sampling-based evaluation of ``data.eval`` (``megarl eval``; in training every
    ``trainer.eval_every`` steps): ``k`` samples per problem, avg@k / maj@k / pass@k (unbiased).

    ``temperature``, ``top_p`` and ``max_response_len`` default to the rollout's.
    """

    k: int = 16
    ks: list[int] | None = None  # the k's reported; None = 1, 2, 4, ... up to k, and k
    temperature: float | None = None
    top_p: float | None = None
    max_response_len: int | None = None
    max_problems: int | None = None  # the first N problems of each benchmark; toy tasks: 64

    def check(self) -> None:
        _positive("eval.k", self.k)
        _positive("eval.max_problems", self.max_problems, allow_none=True)
        _positive("eval.max_response_len", self.max_response_len, allow_none=True)
        if self.ks is not None and (not self.ks or any(not 1 <= k <= self.k for k in self.ks)):
            raise ConfigError("eval.ks", self.ks, f"give k's in [1, eval.k={self.k}]")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError("eval.temperature", self.temperature, "must be > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError("eval.top_p", self.top_p, "must be in (0, 1]")

    def reported_ks(self) -> list[int]:
        if self.ks is not None:
            return sorted(set(self.ks))
        return sorted({2**i for i in range(self.k.bit_length()) if 2**i <= self.k} | {self.k})


@dataclass
class CheckpointConfig:
    """Distributed checkpoints. ``dir`` defaults to ``<run dir>/checkpoints``."""

    dir: str | None = None
    save_every: int = 0  # 0 = only at the end
    keep_last: int | None = None
    # "auto" = the newest complete checkpoint in dir (a fresh start when there is none), "never",
    # or the path of one step_* checkpoint
    resume: str = "auto"
    save_hf: bool = False  # also export HF safetensors at the end

    def check(self) -> None:
        if self.save_every < 0:
            raise ConfigError("checkpoint.save_every", self.save_every, "must be >= 0")
        _positive("checkpoint.keep_last", self.keep_last, allow_none=True)
        _not_a_file("checkpoint.dir", self.dir)


@dataclass
class LoggingConfig:
    """Metric sinks and the run directory ``<dir>/<run_name>``."""

    sinks: list[Sink] = field(default_factory=lambda: ["console", "jsonl"])
    dir: str = "runs"
    run_name: str | None = None  # None = a timestamp
    log_every: int = 1
    wandb_project: str = "megarl"
    wandb_entity: str | None = None

    def check(self) -> None:
        if len(set(self.sinks)) != len(self.sinks):
            raise ConfigError("logging.sinks", self.sinks, "each sink at most once")
        _positive("logging.log_every", self.log_every)
        _not_a_file("logging.dir", self.dir)


def _not_a_file(path: str, directory: str | None) -> None:
    """A directory the run will create or reuse must not be an existing file (checked by
    ``plan`` too, before any model is built)."""
    if directory is not None and Path(directory).expanduser().is_file():
        raise ConfigError(path, directory, "is a file: give a directory (created if missing)")


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate a config from plain data (e.g. parsed YAML)."""
        config = _build(cls, data, "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (e.g. ``<run dir>/config.yaml``)."""
        Path(path).write_text(self.to_yaml())

    def validate(self) -> None:
        """Check every section, then the combinations across sections."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).check()
        facts = self.model.facts()  # model.check() checked the HF config's fields
        self.parallel.check_model(facts)
        replay = self.model.replay_mode(facts)
        if replay != "off" and facts.is_moe is False:
            raise ConfigError("model.routing_replay", self.model.routing_replay,
                              "needs an MoE model (use off for a dense one)")
        if replay == "r2" and self.algo.old_logprobs != "recompute":
            raise ConfigError("model.routing_replay", "r2", "records routes in the old-log-prob "
                              "pass: needs algo.old_logprobs=recompute (or use r3)")
        if self.trainer.eval_every and not self.data.eval:
            raise ConfigError("trainer.eval_every", self.trainer.eval_every,
                              "evaluates data.eval, which is empty: name benchmarks in data.eval "
                              "or set trainer.eval_every=0")
        if self.algo.overlong_buffer > self.rollout.max_response_len:
            raise ConfigError("algo.overlong_buffer", self.algo.overlong_buffer,
                              f"must be <= rollout.max_response_len="
                              f"{self.rollout.max_response_len}")
        length = self.rollout.max_prompt_len + self.rollout.max_response_len
        if facts.max_position_embeddings and length > facts.max_position_embeddings:
            raise ConfigError(
                "rollout.max_response_len",
                self.rollout.max_response_len,
                f"max_prompt_len + max_response_len = {length} exceeds the model's "
                f"max_position_embeddings={facts.max_position_embeddings}",
            )
        world = self.parallel.world_size
        if world is not None and world % self.rollout.tp:
            raise ConfigError(
                "rollout.tp", self.rollout.tp, f"must divide the world size {world}"
            )
        self._check_batches()
        group_based = self.algo.advantage in _GROUP_BASELINES or self.algo.dynamic_sampling
        if group_based and self.rollout.n_samples < 2:
            what = "dynamic sampling" if self.algo.dynamic_sampling else self.algo.advantage
            raise ConfigError(
                "rollout.n_samples", self.rollout.n_samples, f"must be >= 2 for {what}"
            )

    def _check_batches(self) -> None:
        t = self.trainer
        sequences = t.prompts_per_step * self.rollout.n_samples
        if sequences % t.mini_batch_size:
            raise ConfigError(
                "trainer.mini_batch_size",
                t.mini_batch_size,
                f"must divide prompts_per_step*n_samples = {t.prompts_per_step}*"
                f"{self.rollout.n_samples} = {sequences}",
            )
        dp = self.parallel.data_parallel_size()
        if dp is None:
            return
        if t.mini_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(
                "trainer.mini_batch_size",
                t.mini_batch_size,
                f"must be a multiple of dp*micro_batch_size = {dp}*{t.micro_batch_size}",
            )

    # Derived shapes, for the plan and the trainer.
    @property
    def sequences_per_step(self) -> int:
        return self.trainer.prompts_per_step * self.rollout.n_samples

    @property
    def mini_batches_per_epoch(self) -> int:
        return self.sequences_per_step // self.trainer.mini_batch_size

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step (epochs x mini-batches)."""
        return self.trainer.epochs * self.mini_batches_per_epoch


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; duplicate keys and non-mappings are errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the config "
                        "as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _TooLarge as e:
        raise UserError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: invalid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise UserError(f"{p}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), data, "a config file must hold a mapping of sections")
    return data


def parse_scalar(text: str) -> Any:
    """An override value, parsed as YAML (``8`` -> int, ``1e-6`` -> float, ``null`` -> None)."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except _TooLarge:
        raise
    except (yaml.YAMLError, RecursionError):
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in nested ``data``, creating mappings on the way."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("override", override, "expected KEY=VALUE, e.g. algo.loss=up_gspo")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(where, child, f"is not a section, cannot set {key}")
        node = child
    try:
        node[leaf] = parse_scalar(raw)
    except _TooLarge as e:
        raise ConfigError(key, Short(raw), str(e)) from None


# --------------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "config", data, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = _suggest(str(key), names, prefix)
            allowed = f"unknown key{hint}; allowed: {', '.join(names)}"
            raise ConfigError(path, Short(value), allowed)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against type ``tp`` (and converted: int -> float, tuple -> list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], path)
            except ConfigError as e:
                raise ConfigError(path, value, f"{e.allowed} or null") from None
        for a in inner:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(path, value, f"must be {' or '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(path, value, f"must be one of {_alts(args)}{_suggest(value, args)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, value, f"must be {_describe(tp)}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "must be a mapping")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}.{k}", v, "keys must be strings")
            out[k] = _coerce(v, args[1], f"{path}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, value, "must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    raise ConfigError(path, value, f"must be {_describe(tp)}")


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is Literal:
        return f"one of {_alts(typing.get_args(tp))}"
    names = {bool: "a bool", int: "an int", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _positive(path: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(path, value, "must be an int >= 1")


def _alts(options: Sequence[Any]) -> str:
    return ", ".join(repr(o) for o in options)


def _suggest(word: Any, options: Sequence[Any], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest option, or nothing."""
    if not isinstance(word, str):
        return ""
    strings = [o for o in options if isinstance(o, str)]
    match = difflib.get_close_matches(word, strings, n=1, cutoff=0.6)
    if not match:
        return ""
    full = f"{prefix}.{match[0]}" if prefix else match[0]
    return f" (did you mean {full!r}?)"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# A config is a few hundred values; aliases (``*a``) repeat their anchor's content, and a
# "billion laughs" document of 1.4 KB expands into hundreds of millions of values when the
# config is copied or saved. Documents that expand past this many values are refused.
MAX_YAML_VALUES = 100_000


class _TooLarge(yaml.YAMLError):
    """A YAML document that expands past `MAX_YAML_VALUES`, or contains itself."""


def _expanded_size(root: yaml.Node) -> int:
    """The values (scalars, lists, mappings) of the document with every alias expanded, counted
    over its distinct nodes (a shared node adds its size each time it appears), so a document
    is refused before it is built; raises `_TooLarge` past `MAX_YAML_VALUES`."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes on the current path: an alias to one is recursive
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            open_.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
            if size > MAX_YAML_VALUES:
                raise _TooLarge(f"the YAML expands to more than {MAX_YAML_VALUES:,} values "
                                "(an alias repeats its anchor's content); refused")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            raise _TooLarge("a YAML alias refers to a node that contains it (a recursive "
                            "document); refused")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-6`` as a float (YAML 1.2), rejects duplicate keys and refuses
    documents whose aliases expand past `MAX_YAML_VALUES` values."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
