"""Run configuration: the config sections and their validation (the layout: `megarl.layout`;
the trainer, eval, checkpoint and logging sections: `megarl.config_run`; YAML and typed
construction: `megarl.config_yaml`).

A run is described by one YAML file whose top-level sections mirror the dataclasses below
(``model``, ``parallel``, ``rollout``, ``algo``, ``data``, ``trainer``, ``checkpoint``,
``logging``). Command-line overrides use dotted paths and YAML scalars::

    load_config("run.yaml", ["algo.loss=dapo", "algo.params.eps_high=0.28", "parallel.ep=8"])

Every mistake — an unknown key at any depth, a wrong type, a value out of range or a
combination that cannot run — raises one :class:`~megarl.errors.ConfigError` whose one-line
message names the field, the value and what is allowed.

Conventions: a *sequence* is one sampled response (``prompts_per_step * rollout.n_samples``
sequences per step); ``trainer.mini_batch_size`` and ``trainer.micro_batch_size`` count
sequences (the mini-batch globally, the micro-batch per data-parallel rank), unless
``trainer.max_tokens_per_micro_batch`` packs micro-batches by tokens instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megarl.batching import round_up, row_multiples
from megarl.config_fields import alts, one_line, positive, suggest
from megarl.config_run import CheckpointConfig, EvalConfig, LoggingConfig, TrainerConfig
from megarl.config_yaml import apply_override, build, parse_scalar, read_yaml
from megarl.errors import ConfigError, UserError
from megarl.hf_checks import check_hf_config
from megarl.layout import ModelFacts, ParallelConfig
from megarl.losses.objective import Objective
from megarl.losses.rollout_correction import RolloutCorrection

Dtype = Literal["float32", "bfloat16", "float16"]
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
        # "~/..." paths (a cache folder) mean the same to every reader: transformers, vLLM
        for name in ("name_or_path", "tokenizer"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, str(Path(value).expanduser()))
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
            raise UserError(f"cannot read {path}: {one_line(e)}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not an HF config (a JSON object of fields)")
        return data

    def known_config(self) -> dict[str, Any]:
        """The HF config as far as it is known offline: local config.json updated by hf_config."""
        return {**(self.checkpoint_config() or {}), **self.hf_config}

    def facts(self) -> ModelFacts:
        """Architecture numbers that constrain the parallel layout (None when unknown)."""
        return ModelFacts.from_hf(self.known_config())


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
        positive("rollout.n_samples", self.n_samples)
        if not self.temperature > 0:
            raise ConfigError("rollout.temperature", self.temperature, "must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError("rollout.top_k", self.top_k, "must be -1 (off) or >= 1")
        positive("rollout.max_prompt_len", self.max_prompt_len)
        positive("rollout.max_response_len", self.max_response_len)
        positive("rollout.tp", self.tp)
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
class RolloutCorrectionConfig:
    """Importance weights between the trainer's old policy and the engine's sampler
    (`megarl.losses.rollout_correction`): ``mode`` off, token_tis, token_mis, token_mask,
    seq_tis, seq_mask or geo_mask; ``lower`` / ``upper`` bound the ratio (null: the mode's
    default, 0.5 and 2)."""

    mode: str = "off"
    lower: float | None = None
    upper: float | None = None

    def resolve(self) -> RolloutCorrection | None:
        return RolloutCorrection.resolve(self.mode, self.lower, self.upper)


@dataclass
class AlgoConfig:
    """The RL objective: policy loss (``megarl.losses``), advantages, KL, filtering.

    ``agg=None`` means the loss's own default aggregation; ``params`` are the loss's
    hyperparameters (missing ones take the loss's defaults, see ``objective``).
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
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def check(self) -> None:
        from megarl.advantages import ADVANTAGE_ESTIMATORS

        self.objective()  # loss, hyperparameters, agg, KL and entropy terms: the loss library
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            hint = suggest(self.advantage, ADVANTAGE_ESTIMATORS)
            allowed = f"must be one of {alts(ADVANTAGE_ESTIMATORS)}{hint}"
            raise ConfigError("algo.advantage", self.advantage, allowed)
        positive("algo.max_sampling_rounds", self.max_sampling_rounds)
        if self.overlong_buffer < 0:
            raise ConfigError("algo.overlong_buffer", self.overlong_buffer,
                              "must be >= 0 (0 = off)")
        if self.overlong_penalty < 0:
            raise ConfigError("algo.overlong_penalty", self.overlong_penalty, "must be >= 0")
        if self.rollout_correction.mode != "off" and self.old_logprobs == "rollout":
            raise ConfigError("algo.rollout_correction.mode", self.rollout_correction.mode,
                              "compares recomputed old log-probs with the engine's: needs "
                              "algo.old_logprobs=recompute")

    def objective(self, norm_length: float | None = None) -> Objective:
        """The objective these fields describe, looked up and validated (``agg=None``: the
        loss's default; missing ``params``: the loss's defaults). `norm_length` is Dr. GRPO's
        constant, the run's maximum response length (`Config.objective`)."""
        return Objective.resolve(self.loss, self.params, agg=self.agg, kl_beta=self.kl_beta,
                                 kl_type=self.kl_type, entropy_coef=self.entropy_coef,
                                 norm_length=norm_length,
                                 rollout_correction=self.rollout_correction.resolve())


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
    # math: math-verify on the last \boxed{}; exact: the toy tasks' leading number;
    # reasoning_gym: a reasoning_gym:<task>'s own scorer (megarl/data/gym.py)
    reward: Literal["math", "exact", "reasoning_gym"] = "math"
    reward_workers: int = 4
    # reasoning_gym:<task> sources: each task's generator options, e.g.
    # {chain_sum: {min_terms: 2, max_terms: 2}}; the held-out split is the questions whose hash
    # falls below held_out_fraction (never trained on), drawn with reasoning_gym_seed
    reasoning_gym: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasoning_gym_seed: int = 0
    held_out_fraction: float = 0.1
    shuffle: bool = True
    # Keep only the data.train rows whose column (a dotted key reaches a nested one) holds one of
    # the listed values, e.g. MATH levels 3-5: {level: [Level 3, Level 4, Level 5]}; {} keeps
    # every row. Benchmarks (data.eval) are never filtered.
    train_filter: dict[str, list[str | int]] = field(default_factory=dict)

    def check(self) -> None:
        if not self.train:
            raise ConfigError("data.train", self.train, "must name a dataset")
        positive("data.reward_workers", self.reward_workers)
        for column, values in self.train_filter.items():
            if not column or not values:
                raise ConfigError(f"data.train_filter.{column}", values,
                                  "list the values to keep (at least one)")
        if self.train_filter and self.train.startswith(("toy:", "reasoning_gym:")):  # generated
            raise ConfigError("data.train_filter", self.train_filter,
                              f"filters dataset rows; the {self.train.split(':')[0]} task "
                              f"{self.train} has none")
        if not 0 < self.held_out_fraction < 1:
            raise ConfigError("data.held_out_fraction", self.held_out_fraction,
                              "must be in (0, 1): the share of questions held out for eval")
        if self.reasoning_gym_seed < 0:
            raise ConfigError("data.reasoning_gym_seed", self.reasoning_gym_seed,
                              "must be an int >= 0")
        for task, options in self.reasoning_gym.items():
            if not isinstance(options, dict):
                raise ConfigError(f"data.reasoning_gym.{task}", options,
                                  "must be a mapping of the generator's options")
        if self.reward == "reasoning_gym":
            for name, source in [("data.train", self.train)] + [
                    ("data.eval", e) for e in self.eval]:  # fmt: skip
                if not source.startswith("reasoning_gym:"):
                    raise ConfigError(name, source, "data.reward=reasoning_gym scores "
                                      "reasoning_gym:<task> data only; use data.reward=math")


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
        config = build(cls, data, "")
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

    def objective(self) -> Objective:
        """The run's objective, resolved (Dr. GRPO's constant: ``rollout.max_response_len``)."""
        return self.algo.objective(norm_length=self.rollout.max_response_len)

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
        if self.trainer.eval_before_train and not self.data.eval:
            raise ConfigError("trainer.eval_before_train", True, "evaluates data.eval, which is "
                              "empty: name benchmarks in data.eval or set it to false")
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
        if t.max_tokens_per_micro_batch is not None:
            self._check_token_budget(dp)
            return
        if t.mini_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(
                "trainer.mini_batch_size",
                t.mini_batch_size,
                f"must be a multiple of dp*micro_batch_size = {dp}*{t.micro_batch_size}",
            )

    def _check_token_budget(self, dp: int) -> None:
        t, p = self.trainer, self.parallel
        if t.mini_batch_size < dp:
            raise ConfigError("trainer.mini_batch_size", t.mini_batch_size,
                              f"must be >= dp = {dp} (one sequence at least per DP rank)")
        _, multiple = row_multiples(p.tp, p.cp, p.use_sequence_parallel)
        if t.max_tokens_per_micro_batch * p.cp < multiple:
            raise ConfigError("trainer.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch,
                              f"must be >= {multiple // p.cp} (a packed row is a multiple of "
                              f"{multiple} tokens with tp={p.tp}, cp={p.cp})")

    @property
    def micro_batch_row_tokens(self) -> int | None:
        """Tokens of the longest packed row under the token budget (None: counted batches):
        the budget on each of the cp GPUs that share a row, or one sequence at full length
        when that is longer (it travels alone)."""
        budget = self.trainer.max_tokens_per_micro_batch
        if budget is None:
            return None
        p, r = self.parallel, self.rollout
        seq_multiple, multiple = row_multiples(p.tp, p.cp, p.use_sequence_parallel)
        longest = round_up(round_up(r.max_prompt_len + r.max_response_len, seq_multiple), multiple)
        return max(budget * p.cp // multiple * multiple, longest)

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


__all__ = ["CheckpointConfig", "Config", "EvalConfig", "LoggingConfig", "ModelFacts",
           "ParallelConfig", "TrainerConfig", "apply_override", "load_config", "parse_scalar",
           "read_yaml"]
