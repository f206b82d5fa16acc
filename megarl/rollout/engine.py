"""The rollout-engine contract every engine honours (the transformers one and vLLM).

Routes: for an MoE model the engine returns, per sample, the experts its router chose for every
token it FED FORWARD: ``[len(prompt) + len(response) - 1, moe_layers, topk]`` (the last sampled
token is never fed), MoE layers in model order, in the smallest integer dtype that holds the
expert ids. `megarl.megatron.router_replay` replays them in training (R3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from megarl.errors import ConfigError
from megarl.routes import route_dtype  # noqa: F401 (re-exported: the engines' import)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """What vLLM's ``SamplingParams`` calls the same names; ``top_k <= 0`` means no top-k;
    ``temperature=0`` is greedy decoding (evaluation; its log-probs are at temperature 1)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # else the model's EOS token(s) stop too
    seed: int | None = None

    def check(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError("rollout.temperature", self.temperature,
                              "must be > 0 (0: greedy, for evaluation)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p", self.top_p, "must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError("rollout.max_tokens", self.max_tokens, "must be >= 1")


@dataclass
class Rollout:
    """One sampled response."""

    prompt_ids: Tensor  # [P] int64
    response_ids: Tensor  # [R] int64
    logprobs: Tensor  # [R] float32: log softmax(logits / temperature) at the sampled token
    finish_reason: FinishReason
    routed_experts: Tensor | None = None  # [P + R - 1, moe_layers, topk], compact int dtype

    @property
    def token_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids])


class NonFiniteRollout(RuntimeError):
    """The policy's next-token distribution is not finite: its weights have diverged."""


def check_rollouts(rollouts: Sequence[Rollout]) -> None:
    """NonFiniteRollout when a sampled token's log-prob is NaN, infinite or above 0 (every
    engine; `megarl.rollout.hf` checks the logits before it samples, too)."""
    bad = sum(not bool((torch.isfinite(r.logprobs) & (r.logprobs <= 1e-4)).all())
              for r in rollouts)
    if bad:
        raise NonFiniteRollout(f"{bad} of {len(rollouts)} responses have sampled-token "
                               "log-probs that are NaN, infinite or above 0")


@dataclass
class RolloutBatch:
    rollouts: list[Rollout] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rollouts)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample one response per prompt (repeat a prompt for a group)."""

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Load ``(hf_name, full tensor)`` pairs (any subset, any order; a lazy stream the engine
        reads to the end) and drop caches computed by the old weights; returns bytes loaded."""

    def sleep(self) -> None:
        """Free accelerator memory (weights and cache) while training runs."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take memory back: ``["weights"]`` before `update_weights`, ``["kv_cache"]`` after it
        (never both loading at once), all of it when None."""
