"""The parallel layout, pure (no megatron import): the degrees (tp, pp, vpp, cp, dp, ep, etp,
sequence parallelism), how they resolve against a world size, every rule a layout must meet
for a model (heads, KV groups, layers, experts, vocabulary, MoE with TP), and the ranks: each
axis's groups, one rank's coordinates (`RankCoordinates`), each stage's layers and each EP
rank's experts. Config validation,
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

    def resolved(self) -> ParallelConfig | None:
        """The layout resolved against its own ``world_size`` (None when the launcher decides)."""
        return None if self.world_size is None else self.resolve(self.world_size)

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

    # ---- the ranks of a resolved layout (megatron-core's RankGenerator order) ----------------
    # dense axes "tp-cp-dp-pp", expert axes "etp-ep-edp-pp", the first axis fastest: consecutive
    # ranks share a TP group, a pipeline stage is a contiguous block of ranks

    def _resolved(self) -> tuple[int, int]:
        if self.world_size is None:
            raise ValueError("the layout's world size is unknown: resolve(world_size) first")
        return self.world_size, int(self.data_parallel_size(self.world_size))  # type: ignore[arg-type]

    @property
    def edp(self) -> int:
        """Expert data-parallel size: the ranks of one stage re-folded as etp x ep x edp."""
        world, _ = self._resolved()
        return world // (self.pp * self.ep * self.expert_tp)

    def _axes(self, expert: bool) -> list[tuple[str, int]]:
        world, dp = self._resolved()
        if expert:
            return [("etp", self.expert_tp), ("ep", self.ep), ("edp", self.edp), ("pp", self.pp)]
        return [("tp", self.tp), ("cp", self.cp), ("dp", dp), ("pp", self.pp)]

    def _indices(self, rank: int, expert: bool) -> dict[str, int]:
        out, rest = {}, rank
        for name, size in self._axes(expert):  # mixed radix, first axis fastest
            out[name], rest = rest % size, rest // size
        return out

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis`` (tp, cp, dp, pp, ep, etp, edp), each sorted, by first rank."""
        expert = axis in ("ep", "etp", "edp")
        if axis not in dict(self._axes(expert)):
            raise ValueError(f"unknown axis {axis!r}")
        found: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self._resolved()[0]):
            index = self._indices(rank, expert)
            found.setdefault(tuple(c for a, c in index.items() if a != axis), []).append(rank)
        return sorted(found.values())

    def group_of(self, axis: str, rank: int) -> list[int]:
        return next(g for g in self.groups(axis) if rank in g)

    def coordinates(self, rank: int, vp_stage: int = 0) -> RankCoordinates:
        """Where `rank` (and its model chunk `vp_stage`) sits: sizes and indices on every axis."""
        world, dp = self._resolved()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        dense, expert = self._indices(rank, False), self._indices(rank, True)
        return RankCoordinates(
            world_size=world, rank=rank, tp=self.tp, tp_rank=dense["tp"], pp=self.pp,
            pp_rank=dense["pp"], cp=self.cp, cp_rank=dense["cp"], dp=dp, dp_rank=dense["dp"],
            ep=self.ep, ep_rank=expert["ep"], etp=self.expert_tp, etp_rank=expert["etp"],
            vpp=self.vpp or 1, vp_stage=vp_stage,
            sequence_parallel=self.use_sequence_parallel)  # fmt: skip

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Decoder layers per pipeline rank: megatron's even split (pp*vpp divides the layers);
        with VPP, rank p holds chunk v = layers [(v*pp + p)*n, (v*pp + p + 1)*n) for
        n = layers/(pp*vpp)."""
        vpp = self.vpp or 1
        n = num_layers // (self.pp * vpp)
        return [[layer for v in range(vpp) for layer in range((v * self.pp + p) * n,
                                                             (v * self.pp + p + 1) * n)]
                for p in range(self.pp)]

    def expert_ranges(self, num_experts: int) -> list[range]:
        """Experts per EP rank: contiguous blocks of num_experts/ep (megatron's local experts)."""
        n = num_experts // self.ep
        return [range(r * n, (r + 1) * n) for r in range(self.ep)]


@dataclass(frozen=True)
class RankCoordinates:
    """One rank's place in a resolved layout (`ParallelConfig.coordinates`), and for a model
    chunk its virtual pipeline stage: the size of every axis and this rank's index on it.
    Conversion and weight sync shard by it; the trainer reads its data-parallel share from it."""

    tp: int = 1
    tp_rank: int = 0
    pp: int = 1
    pp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    etp: int = 1
    etp_rank: int = 0
    vpp: int = 1
    vp_stage: int = 0
    sequence_parallel: bool = False
    world_size: int = 1
    rank: int = 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1
