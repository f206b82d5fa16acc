"""The trained policy on megatron-core: process groups, model chunks, DDP, optimizer, replay.

`Policy` is what the trainer holds of Megatron: it builds everything from the run config and an
HF config (weights from an HF checkpoint, or megatron's own initialisation for a model built
from scratch), turns `TrainSample`s into packed micro-batches for this data-parallel rank, and
runs the forward-only and training passes with routing replay as configured. On a machine
without CUDA it installs the CPU shim (`megarl.megatron.cpu`) first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megarl.batching import Cut, cut_batch, row_multiples
from megarl.config import Config, ModelFacts
from megarl.convert.hf_io import HFCheckpoint
from megarl.convert.mapping import Architecture
from megarl.layout import RankCoordinates
from megarl.losses.objective import Objective
from megarl.megatron.dist_checkpoint import load_distributed, save_distributed
from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp
from megarl.megatron.optimizer import build_optimizer
from megarl.megatron.packing import PackedMicroBatch, pack_groups
from megarl.megatron.parallel import init_process_group, initialize_parallel
from megarl.megatron.router_replay import RouteRecorder, RouteReplayer, sample_routes
from megarl.megatron.step import (
    ForwardOptions,
    attach_schedule_hooks,
    compute_logprobs,
    train_step,
)
from megarl.megatron.update_guard import UpdateGuard, all_finite_over_world
from megarl.megatron.weights import export_hf_weights, load_hf_weights, save_hf_checkpoint
from megarl.policy_io import StepResult, TrainSample


def start_distributed() -> None:
    """torch.distributed from torchrun's environment (a world of one without it); the CPU shim
    when no CUDA device is visible."""
    if not torch.cuda.is_available():
        from megarl.megatron import cpu

        cpu.install()
    init_process_group()


class Policy:
    def __init__(self, config: Config, hf_config: Mapping[str, Any],
                 checkpoint: HFCheckpoint | None = None) -> None:  # fmt: skip
        start_distributed()
        self.config, self.hf_config = config, dict(hf_config)
        facts = ModelFacts.from_hf(self.hf_config)
        self.layout: RankCoordinates = initialize_parallel(config.parallel, facts,
                                                          seed=config.trainer.seed)
        self.replay_mode = config.model.replay_mode(facts)
        resolved = config.parallel.resolve(self.layout.world_size)
        self.tconfig = transformer_config_from_hf(
            self.hf_config, resolved, dtype=config.model.dtype,
            routing_replay=self.replay_mode != "off", recompute=config.model.recompute,
            use_transformer_engine=config.model.transformer_engine)
        chunks = build_model(self.tconfig, self.hf_config,
                             use_transformer_engine=config.model.transformer_engine,
                             grouped_experts=config.model.grouped_experts)
        self._source_dir = None if checkpoint is None else checkpoint.path
        if checkpoint is not None:
            load_hf_weights(chunks, checkpoint)
        self.models = wrap_ddp(chunks, self.tconfig)
        attach_schedule_hooks(self.models)
        self.optimizer = build_optimizer(self.models, config.trainer,
                                         params_dtype=self.tconfig.params_dtype)
        self.guard = UpdateGuard(self.models, self.optimizer)
        self.arch = Architecture.from_hf(self.hf_config)
        self.topk = self.arch.topk
        self.replayer = self.recorder = None
        if self.replay_mode != "off":
            self.replayer = RouteReplayer(self.models, self.arch.moe_layers,
                                          self.arch.num_experts, self.topk)
        if self.replay_mode == "r2":
            self.recorder = RouteRecorder(self.models, self.arch.moe_layers,
                                          self.arch.num_experts, self.topk)
        self.options = ForwardOptions(temperature=config.rollout.temperature,
                                      logprob_impl=config.model.logprob_kernel)
        # the KL reference: the initial weights (the HF checkpoint, or the seeded init), kept on
        # the CPU and swapped in for its forward pass; rebuilt identically on resume
        self._reference = self._copy_weights() if config.algo.kl_beta > 0 else None

    # ---- batches ------------------------------------------------------------------------------

    def cut(self, samples: list[TrainSample]) -> Cut:
        """How `samples` (the same list on every rank) split over the DP ranks and into
        micro-batches: `trainer.micro_batch_size` sequences each, or packed by
        `trainer.max_tokens_per_micro_batch` tokens per GPU (`megarl.batching`)."""
        lay, t = self.layout, self.config.trainer
        seq_multiple, row_multiple = row_multiples(lay.tp, lay.cp, lay.sequence_parallel)
        budget = t.max_tokens_per_micro_batch
        interleaved = len(self.models) > 1
        return cut_batch(
            [len(s.tokens) for s in samples], lay.dp,
            micro_batch_size=None if budget else t.micro_batch_size,
            max_tokens=budget * lay.cp if budget else None,
            seq_multiple=seq_multiple, row_multiple=row_multiple,
            count_multiple=lay.pp if interleaved else 1, fixed_shape=interleaved)

    def pack(self, samples: list[TrainSample], groups: list[list[int]]) -> list[PackedMicroBatch]:
        """One packed row per group of indices into `samples` (empty: a padding row)."""
        seq_multiple, row_multiple = row_multiples(self.layout.tp, self.layout.cp,
                                                   self.layout.sequence_parallel)
        return pack_groups(samples, groups, seq_multiple=seq_multiple, row_multiple=row_multiple)

    # ---- passes -------------------------------------------------------------------------------

    def logprobs(self, samples: list[TrainSample], into: str = "old_logprobs",
                 ) -> list[TrainSample]:  # fmt: skip
        """`samples` with ``old_logprobs`` from a forward-only pass, whole on every rank (R3
        replays the engine's routes; R2 records Megatron's own as the samples' routes).
        ``into="ref_logprobs"`` stores them there instead and replays the samples' routes."""
        groups = self.cut(samples).micro_batches[self.layout.dp_rank]
        mbs = self.pack(samples, groups)
        record = self.recorder is not None and into == "old_logprobs"
        replay = self.recorder if record else self.replayer
        rows = compute_logprobs(self.models, mbs, self.options, replay=replay)
        recorded = self.recorder.take(mbs) if record else None
        mine: list[tuple[int, TrainSample]] = []
        for i, (group, mb, row) in enumerate(zip(groups, mbs, rows, strict=True)):
            if not group:  # a padding row
                continue
            logp = mb.unpack(row)
            routes = None if recorded is None else sample_routes(mb, recorded[i])
            for k, index in enumerate(group):
                s = samples[index]
                n = len(s.tokens)
                old = torch.zeros(n, dtype=torch.float32)
                old[1:] = logp[k][: n - 1].float().cpu()  # label-aligned -> token-aligned
                extra = {} if routes is None else {"routed_experts": routes[k]}
                mine.append((index, dataclasses.replace(s, **{into: old}, **extra)))
        parts: list[Any] = [mine]
        if self.layout.dp > 1:
            parts = [None] * self.layout.dp
            dist.all_gather_object(parts, mine, group=ps.get_data_parallel_group())
        out: list[TrainSample | None] = [None] * len(samples)
        for index, sample in (pair for part in parts for pair in part):
            out[index] = sample
        assert all(s is not None for s in out), "a sample is missing from every DP rank's share"
        return out  # type: ignore[return-value]

    def reference_logprobs(self, samples: list[TrainSample]) -> list[TrainSample]:
        """`samples` with ``ref_logprobs`` under the reference (initial) weights, under the
        same routes as the policy's log-probs (a KL of weights, not of routing)."""
        if self._reference is None:
            raise RuntimeError("no reference weights: algo.kl_beta is 0")
        current = self._copy_weights()
        self._set_weights(self._reference)
        try:
            return self.logprobs(samples, into="ref_logprobs")
        finally:
            self._set_weights(current)

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.models for p in m.module.parameters()]

    def _copy_weights(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in self._parameters()]

    @torch.no_grad()
    def _set_weights(self, weights: list[torch.Tensor]) -> None:
        for p, w in zip(self._parameters(), weights, strict=True):
            p.copy_(w, non_blocking=False)

    def train(self, samples: list[TrainSample], objective: Objective, lr: float, *,
              on_grads: Callable[[list[Any]], None] | None = None) -> StepResult:  # fmt: skip
        """One optimizer step on a mini-batch (the same list on every rank); an update that
        leaves the policy non-finite is undone (`UpdateGuard`) and reported as skipped.
        `on_grads(models)` sees the whole reduced gradients before the step (`train_step`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        cut = self.cut(samples)
        local = cut.micro_batches[self.layout.dp_rank]
        self.guard.snapshot()
        result = train_step(self.models, self.optimizer, self.pack(samples, local), objective,
                            self.options, replay=self.replayer, on_grads=on_grads)
        result = dataclasses.replace(
            result, metrics=result.metrics | cut.stats([len(s.tokens) for s in samples]))
        if result.skipped:
            return result
        problem = self.guard.nonfinite_state()
        if problem is None:
            # the new weights on one sequence (a virtual-pipeline schedule needs pp rows; a
            # rank with fewer sequences than that pads)
            mine = [i for group in local for i in group][:1]
            k = self.layout.pp if len(self.models) > 1 else 1
            probe = self.pack(samples, [mine] + [[]] * (k - 1))
            rows = compute_logprobs(self.models, probe, self.options, replay=self.replayer)
            if not all_finite_over_world(rows):
                problem = "log-probs not finite after the update"
        if problem is None:
            return result
        self.guard.restore()
        metrics = result.metrics | {"train/skipped_update": 1.0, "train/undone_update": 1.0}
        return dataclasses.replace(result, metrics=metrics, skipped=True, problem=problem)

    def nonfinite_state(self) -> str | None:
        """What is not finite in the parameters or optimizer state (None: all finite)."""
        return self.guard.nonfinite_state()

    def save_hf(self, out: Path, *, tokenizer_from: str | None = None) -> None:
        """The policy as an HF checkpoint in `out` (replaced if present)."""
        save_hf_checkpoint(self.models, str(out), self.hf_config, tokenizer_from=tokenizer_from,
                           overwrite=True)

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy as ``(hf_name, full tensor)`` pairs for the rollout engine (collective:
        every rank iterates it to the end; `megarl.rollout.sync.sync_weights`)."""
        return export_hf_weights(self.models, self.hf_config)

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Model and optimizer as a megatron distributed checkpoint, with ``hf/`` (the config
        and, from a local model, its tokenizer files): the format `megarl convert` reads."""
        save_distributed(directory, self.models, self.hf_config, optimizer=self.optimizer,
                         tokenizer_from=self._source_dir)

    def load(self, directory: Path) -> None:
        load_distributed(directory, self.models, self.hf_config, optimizer=self.optimizer)
