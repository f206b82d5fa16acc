"""The run's schedule and outputs: the ``trainer``, ``eval``, ``checkpoint`` and ``logging``
config sections (the rest: `megarl.config`). Batch sizes count sequences (`megarl.config`'s
conventions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megarl.config_fields import positive
from megarl.errors import ConfigError

Sink = Literal["console", "progress", "jsonl", "tensorboard", "wandb"]


@dataclass
class TrainerConfig:
    """The optimisation loop. Batch sizes count sequences (see the module docstring)."""

    steps: int = 100
    prompts_per_step: int = 32
    mini_batch_size: int = 256
    micro_batch_size: int = 1
    # tokens per GPU in a micro-batch: when set, micro-batches are packed by tokens, not counted
    # in sequences (micro_batch_size is then unused), and a mini-batch's sequences are spread
    # over the DP ranks by token count (megarl/batching.py); null: micro_batch_size sequences
    max_tokens_per_micro_batch: int | None = None
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
    # evaluate once before the first step of a fresh run, logged as step 0 (verl's
    # val_before_train): the base model's accuracy from the same code, engine and settings
    eval_before_train: bool = False
    # updates in a row that may be skipped (non-finite gradients) or undone (a non-finite
    # policy after the update) before the run stops (megarl/megatron/update_guard.py)
    max_bad_updates: int = 3
    # after a stop signal (USR1, TERM), seconds a rank may take to end its step and checkpoint
    # before it exits without one (null: no limit; the cluster's KillWait or GraceTime decides)
    stop_grace_s: float | None = None

    def check(self) -> None:
        for name in ("steps", "prompts_per_step", "mini_batch_size", "micro_batch_size"):
            positive(f"trainer.{name}", getattr(self, name))
        if self.max_tokens_per_micro_batch is not None:
            positive("trainer.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch)
        positive("trainer.epochs", self.epochs)
        positive("trainer.max_bad_updates", self.max_bad_updates)
        if self.stop_grace_s is not None and not self.stop_grace_s > 0:
            raise ConfigError("trainer.stop_grace_s", self.stop_grace_s,
                              "must be > 0 (or null: no limit)")
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
    # also decode every problem once greedily: greedy@1, the accuracy papers report for small
    # models and the one an exported checkpoint must reproduce exactly
    greedy: bool = False

    def check(self) -> None:
        positive("eval.k", self.k)
        positive("eval.max_problems", self.max_problems, allow_none=True)
        positive("eval.max_response_len", self.max_response_len, allow_none=True)
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
        positive("checkpoint.keep_last", self.keep_last, allow_none=True)
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
        positive("logging.log_every", self.log_every)
        _not_a_file("logging.dir", self.dir)


def _not_a_file(path: str, directory: str | None) -> None:
    """A directory the run will create or reuse must not be an existing file (checked by
    ``plan`` too, before any model is built)."""
    if directory is not None and Path(directory).expanduser().is_file():
        raise ConfigError(path, directory, "is a file: give a directory (created if missing)")
