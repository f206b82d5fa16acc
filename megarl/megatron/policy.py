"""The trained policy on megatron-core: process groups, model chunks, DDP, optimizer, replay.

`Policy` is what the trainer holds of Megatron: it builds everything from the run config and an
HF config (weights from an HF checkpoint, or megatron's own initialisation for a model built
from scratch), turns `TrainSample`s into packed micro-batches for this data-parallel rank, and
runs the forward-only and training passes with routing replay as configured. On a machine
without CUDA it installs the CPU shim (`megarl.megatron.cpu`) first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megarl.config import Config, ModelFacts
from megarl.convert.hf_io import HFCheckpoint
from megarl.convert.mapping import Architecture
from megarl.layout import RankCoordinates
from megarl.losses.objective import Objective
from megarl.megatron.dist_checkpoint import load_distributed, save_distributed
from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp
from megarl.megatron.optimizer import build_optimizer
from megarl.megatron.packing import PackedMicroBatch, make_micro_batches
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

    def local_share(self, samples: list[TrainSample]) -> list[TrainSample]:
        """This DP rank's contiguous share of a batch that every rank holds whole."""
        dp, rank = self.layout.dp, self.layout.dp_rank
        if len(samples) % dp:
            raise ValueError(f"{len(samples)} samples do not split over {dp} DP ranks")
        per_rank = len(samples) // dp
        return samples[rank * per_rank:(rank + 1) * per_rank]

    def micro_batches(self, local: list[TrainSample],
                      count: int | None = None) -> list[PackedMicroBatch]:  # fmt: skip
        """`trainer.micro_batch_size` sequences per micro-batch (or `count` micro-batches),
        packed into one row each."""
        if count is None:
            count = max(1, math.ceil(len(local) / self.config.trainer.micro_batch_size))
        tp = self.layout.tp if self.layout.sequence_parallel else 1
        zigzag = 2 * self.layout.cp if self.layout.cp > 1 else 1  # CP halves every sequence
        return make_micro_batches(local, num_micro_batches=count, seq_multiple=zigzag,
                                  row_multiple=tp * zigzag)

    # ---- passes -------------------------------------------------------------------------------

    def logprobs(self, samples: list[TrainSample], into: str = "old_logprobs",
                 ) -> list[TrainSample]:  # fmt: skip
        """`samples` with ``old_logprobs`` from a forward-only pass, whole on every rank (R3
        replays the engine's routes; R2 records Megatron's own as the samples' routes).
        ``into="ref_logprobs"`` stores them there instead and replays the samples' routes."""
        local = self.local_share(samples)
        mbs = self.micro_batches(local)
        record = self.recorder is not None and into == "old_logprobs"
        replay = self.recorder if record else self.replayer
        rows = compute_logprobs(self.models, mbs, self.options, replay=replay)
        recorded = self.recorder.take(mbs) if record else None
        out: list[TrainSample] = []
        for i, (mb, row) in enumerate(zip(mbs, rows, strict=True)):
            logp = mb.unpack(row)
            routes = None if recorded is None else sample_routes(mb, recorded[i])
            for k in range(len(mb.sample_lengths)):
                s = local[len(out)]
                n = len(s.tokens)
                old = torch.zeros(n, dtype=torch.float32)
                old[1:] = logp[k][: n - 1].float().cpu()  # label-aligned -> token-aligned
                extra = {} if routes is None else {"routed_experts": routes[k]}
                out.append(dataclasses.replace(s, **{into: old}, **extra))
        if self.layout.dp == 1:
            return out
        parts: list[Any] = [None] * self.layout.dp
        dist.all_gather_object(parts, out, group=ps.get_data_parallel_group())
        return [s for part in parts for s in part]

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

    def train(self, samples: list[TrainSample], objective: Objective, lr: float) -> StepResult:
        """One optimizer step on a mini-batch (the same list on every rank); an update that
        leaves the policy non-finite is undone (`UpdateGuard`) and reported as skipped."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local = self.local_share(samples)
        self.guard.snapshot()
        result = train_step(self.models, self.optimizer, self.micro_batches(local), objective,
                            self.options, replay=self.replayer)
        if result.skipped:
            return result
        problem = self.guard.nonfinite_state()
        if problem is None:
            # the new weights on one sequence (a virtual-pipeline schedule needs pp of them)
            k = min(len(local), self.layout.pp if len(self.models) > 1 else 1)
            probe = self.micro_batches(local[:k], count=k)
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
