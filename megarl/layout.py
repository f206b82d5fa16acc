"""The parallel layout, pure (no megatron import): the degrees (tp, pp, vpp, cp, dp, ep, etp,
sequence parallelism), how they resolve against a world size, and every rule a layout must meet
for a model (heads, KV groups, layers, experts, vocabulary, MoE with TP). Config validation,
``megarl plan``, the memory model and megatron's process groups (`megarl.megatron.parallel`) all
check layouts here; tests/unit/test_layout_agreement.py holds it to megatron-core's own verdicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megarl.config_fields import positive
from megarl.errors import ConfigError
from megarl.hf_checks import num_experts_of, router_topk_of


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
            num_experts=num_experts_of(hf),
            moe_router_topk=router_topk_of(hf) or None,
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
            positive(f"parallel.{name}", getattr(self, name), allow_none=True)
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
        positive("parallel.world_size", world_size)
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
