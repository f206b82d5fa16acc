"""The RL loop (DESIGN.md), one optimizer-step cycle at a time, SPMD on every rank:

prompts -> rollout -> rewards -> advantages -> old log-probs (Megatron forward, routing replay)
-> epochs x mini-batches of policy-loss updates -> weight sync -> eval -> metrics -> checkpoint.

Everything else lives where the folder names say: the parts in `megarl.assemble`, Megatron in
`megarl.megatron.policy`, the engine in `megarl.rollout`, checkpoints in `megarl.run_checkpoints`.
Every random choice of a step is seeded by ``(trainer.seed, step)``, so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megarl.advantages import compute_advantages
from megarl.assemble import (
    Rewards,
    build_engine,
    build_prompt_source,
    build_tokenizer,
    model_source,
    prepare_engine_platform,
)
from megarl.config import Config
from megarl.data.rewards import overlong_penalty
from megarl.data.toy import is_toy
from megarl.errors import RunStopped
from megarl.eval_metrics import flatten, summarise, write_results
from megarl.evaluate import Evaluator
from megarl.losses.objective import Objective
from megarl.metrics import combine_updates, log_to_sinks, make_sinks
from megarl.policy_io import StepResult, TrainSample
from megarl.rollout.engine import NonFiniteRollout, Rollout, SamplingParams, check_rollouts
from megarl.rollout.groups import generate_across_groups
from megarl.rollout.mismatch import logprob_mismatch
from megarl.rollout.sync import sync_weights
from megarl.routes import align_routes
from megarl.run_checkpoints import (
    check_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from megarl.stop_signals import StopRequests, report_stop

if TYPE_CHECKING:
    from megarl.megatron.policy import Policy


@dataclass
class StepBatch:
    """One step's sampled groups, scored."""

    rollouts: list[Rollout] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def lr_at(config: Config, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr`` (step counts from 0)."""
    t = config.trainer
    if t.lr_warmup_steps and step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.lr_warmup_steps)
    progress = min(1.0, (step - t.lr_warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, round_: int, group: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + round_ * 104_729 + group * 15_485_863) % 2**62


def diversity_metrics(groups: list[tuple[list[str | None], list[float]]],
                      ) -> dict[str, float]:  # fmt: skip
    """How varied each prompt's answers are, from each response's extracted answer
    (`Rewards.answer_of`: the toy tasks' leading number, the math reward's final answer):
    ``response/distinct_answers_frac``, distinct answers over responses, and
    ``reward/distinct_correct``, the number of different answers with reward > 0.5 (the right
    answers found), both averaged over prompts."""
    distinct, correct = [], []
    for answers, rewards in groups:
        distinct.append(len(set(answers)) / len(answers))
        correct.append(len({a for a, w in zip(answers, rewards, strict=True) if w > 0.5}))
    return {"response/distinct_answers_frac": sum(distinct) / len(distinct),
            "reward/distinct_correct": sum(correct) / len(correct)}


class Trainer:
    def __init__(self, config: Config, *, run_dir: Path | None = None) -> None:
        prepare_engine_platform(config)
        # megatron-core loads Triton, which must come after the engine's platform set-up
        from megarl.megatron.policy import Policy, start_distributed

        self.config = config
        name = config.logging.run_name or time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = run_dir or Path(config.logging.dir) / name
        self.ckpt_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else \
            self.run_dir / "checkpoints"
        start_distributed()
        resume_from = self._resume_point()  # verified before the model is built
        hf_config, checkpoint = model_source(config)
        self.policy: Policy = Policy(config, hf_config, checkpoint)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tokenizer = build_tokenizer(config)
        self.prompts = build_prompt_source(config, self.tokenizer)
        self.rewards = Rewards(config)
        self.engine = build_engine(config, hf_config, rank=self.rank, world_size=self.world,
                                   moe_layers=self.policy.arch.moe_layers,
                                   num_experts=self.policy.arch.num_experts)
        self.eos = int(self.tokenizer.eos_token_id)
        self.step = 0
        self.bad_updates_in_a_row = 0
        if resume_from is not None:
            self._resume(resume_from)
        sync_weights(self.policy.hf_weights(), self.engine,
                     bucket_bytes=config.rollout.sync_bucket_bytes)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.run_dir / "config.yaml")
        self.evaluator: Evaluator | None = None
        if config.trainer.eval_every or config.trainer.eval_before_train:
            self.evaluator = Evaluator(config, self.tokenizer, self.rewards, rank=self.rank,
                                       world=self.world)
        # a run starting at step S (0 when fresh) drops what an earlier attempt logged after S
        # (a fresh run that evaluates first logs a step 0: an earlier attempt's is dropped too)
        self.evaluates_first = self.evaluator is not None and \
            config.trainer.eval_before_train and self.step == 0
        self.sinks = make_sinks(config.logging, self.run_dir, config.to_dict(),
                                resume_step=-1 if self.evaluates_first else self.step)

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict[str, float]]:
        """Run to ``trainer.steps``; returns every step's metrics."""
        objective = self.config.objective()  # resolved once: the loss, its terms, validated
        history = []
        t = self.config.trainer
        start_step = self.step
        stops = StopRequests(t.stop_grace_s)
        stops.install()  # USR1 / TERM: finish this step, checkpoint, stop (docs/slurm.md)
        try:
            if self.evaluates_first:
                log_to_sinks(self.sinks, 0, self.evaluate())
            while self.step < t.steps:
                metrics = self.train_step(objective)
                self.step += 1
                if t.eval_every and self.step % t.eval_every == 0:
                    metrics |= self.evaluate()
                history.append(metrics)
                log_to_sinks(self.sinks, self.step, metrics)
                every = self.config.checkpoint.save_every
                saved = (every and self.step % every == 0) or self.step == t.steps
                if saved:
                    self.save()
                if self.step < t.steps and stops.agreed():
                    if not saved:
                        self.save()
                    stops.stopped()
                    self._report_stop(start_step, stops.signal or "a stop request")
                    return history
            if self.config.checkpoint.save_hf:
                self.save_hf()
            self._report_stop(start_step, "finished")
        finally:
            stops.uninstall()
            for sink in self.sinks:
                sink.close()
            self.rewards.close()
        return history

    def _report_stop(self, start_step: int, reason: str) -> None:
        """Say where the run stopped (rank 0; the Slurm launcher reads ``$MEGARL_STOP_STATUS``)."""
        if self.rank != 0:
            return
        newest = latest_checkpoint(self.ckpt_dir)
        report_stop(start_step, self.step, newest, reason)
        if reason != "finished":
            print(f"{reason}: stopped after step {self.step} with checkpoint {newest}; "
                  "checkpoint.resume=auto continues from it", flush=True)

    def train_step(self, objective: Objective) -> dict[str, float]:
        cfg, timings = self.config, {}
        start = time.perf_counter()
        batch = self.sample()
        timings["time/rollout"] = time.perf_counter() - start
        samples, adv_metrics = self.samples_of(batch)
        self.engine.sleep()
        t0 = time.perf_counter()
        metrics = dict(batch.metrics) | adv_metrics
        if cfg.algo.old_logprobs == "recompute":
            samples = self.policy.logprobs(samples)
            metrics |= self._mismatch(batch.rollouts, samples)
            if self.policy.replayer is not None:
                metrics |= self.policy.replayer.last_metrics
        timings["time/old_logprobs"] = time.perf_counter() - t0
        if cfg.algo.kl_beta > 0:
            t0 = time.perf_counter()
            samples = self.policy.reference_logprobs(samples)
            timings["time/ref_logprobs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lr = lr_at(cfg, self.step)
        results = []
        size = cfg.trainer.mini_batch_size
        for epoch in range(cfg.trainer.epochs):
            order = samples
            if epoch > 0:
                g = torch.Generator().manual_seed(step_seed(cfg.trainer.seed, self.step, epoch))
                order = [samples[i] for i in torch.randperm(len(samples), generator=g)]
            for start_mb in range(0, len(order), size):
                results.append(self.policy.train(order[start_mb:start_mb + size], objective, lr))
                self._count_bad_update(results[-1])
        timings["time/train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sync = sync_weights(self.policy.hf_weights(), self.engine,
                            bucket_bytes=cfg.rollout.sync_bucket_bytes)
        timings["time/sync"] = time.perf_counter() - t0
        for k, v in combine_updates([r.metrics for r in results]).items():
            if k.startswith("router/"):  # the old-log-prob pass's keep their names
                k = "router/train_" + k.removeprefix("router/")
            metrics[k] = v
        metrics["train/lr"] = lr
        timings["time/step"] = time.perf_counter() - start
        return metrics | sync | timings

    def _count_bad_update(self, result: StepResult) -> None:
        """Stop the run (no checkpoint for this step) after ``trainer.max_bad_updates``
        skipped or undone updates in a row."""
        if not result.skipped:
            self.bad_updates_in_a_row = 0
            return
        self.bad_updates_in_a_row += 1
        limit = self.config.trainer.max_bad_updates
        if self.bad_updates_in_a_row < limit:
            return
        newest = latest_checkpoint(self.ckpt_dir)
        where = (f"checkpoint.resume=auto continues from {newest.name}" if newest is not None
                 else "no checkpoint was written")
        raise RunStopped(
            f"step {self.step + 1}: {limit} updates in a row were skipped or undone (the last: "
            f"{result.problem}); stopped without writing a checkpoint, {where}. Lower "
            f"trainer.lr (now {self.config.trainer.lr:g}) or raise trainer.max_bad_updates")

    def evaluate(self) -> dict[str, float]:
        """``data.eval`` on the engine the step just synced: ``eval/<bench>/<metric>``, and
        every problem's answers in ``<run dir>/eval/step_N.jsonl``."""
        start = time.perf_counter()
        results = self.evaluator.results(self.engine)
        if self.rank == 0:  # every problem's answers: <run dir>/eval/step_N.jsonl
            write_results(results, self.run_dir / "eval" / f"step_{self.step:06d}.jsonl")
        metrics = flatten(summarise(results, self.config.eval.reported_ks()))
        return metrics | {"time/eval": time.perf_counter() - start}

    # ---- phases -------------------------------------------------------------------------------

    def sample(self) -> StepBatch:
        """``prompts_per_step`` groups of ``n_samples`` responses, scored; with dynamic sampling,
        groups whose rewards are all equal are dropped and more are drawn (at most
        ``max_sampling_rounds`` rounds; the batch is then topped up with dropped groups)."""
        cfg, n = self.config, self.config.rollout.n_samples
        want = cfg.trainer.prompts_per_step
        kept: list[tuple[list[Rollout], list[float], list[str | None]]] = []
        dropped: list[tuple[list[Rollout], list[float], list[str | None]]] = []
        metrics: dict[str, float] = {}
        rounds = cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1
        for round_ in range(rounds):
            prompts = self.prompts.next_batch(want)
            try:
                rollouts = self._generate([p.prompt_ids for p in prompts for _ in range(n)],
                                          round_)
                check_rollouts(rollouts)
            except NonFiniteRollout as e:
                raise RunStopped(f"step {self.step + 1}: {e}: the policy's weights have "
                                 "diverged; lower trainer.lr and resume from an earlier "
                                 "checkpoint") from e
            texts = [self.tokenizer.decode(r.response_ids.tolist()) for r in rollouts]
            answers = [p.answer for p in prompts for _ in range(n)]
            rewards, reward_metrics = self.rewards(texts, answers)
            metrics |= reward_metrics
            if cfg.algo.overlong_buffer:
                rewards = self._punish_overlong(rollouts, rewards, metrics)
            extracted = [self.rewards.answer_of(t) for t in texts]  # the diversity metrics'
            for g in range(len(prompts)):
                span = slice(g * n, (g + 1) * n)
                group = (rollouts[span], rewards[span], extracted[span])
                informative = max(group[1]) > min(group[1])
                (kept if informative or not cfg.algo.dynamic_sampling else dropped).append(group)
            if len(kept) >= want:
                break
        metrics["sampling/rounds"] = float(round_ + 1)
        metrics["data/prompts_dropped"] = float(getattr(self.prompts, "num_dropped", 0))
        groups = (kept + dropped)[:want]
        batch = StepBatch(metrics=metrics)
        for rollouts, rewards, _ in groups:
            batch.rollouts += rollouts
            batch.rewards += rewards
        lengths = torch.tensor([len(r.response_ids) for r in batch.rollouts], dtype=torch.float)
        rewards_t = torch.tensor(batch.rewards)
        batch.metrics |= {
            "reward/mean": float(rewards_t.mean()),
            "reward/informative_groups": float(sum(max(r) > min(r) for _, r, _ in groups)),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(sum(r.finish_reason == "length"
                                                 for r in batch.rollouts) / len(batch.rollouts)),
        } | diversity_metrics([(answers, rewards) for _, rewards, answers in groups])
        return batch

    def _punish_overlong(self, rollouts: list[Rollout], rewards: list[float],
                         metrics: dict[str, float]) -> list[float]:  # fmt: skip
        """DAPO's soft overlong punishment added to the task rewards (``algo.overlong_*``)."""
        algo = self.config.algo
        penalties = [overlong_penalty(len(r.response_ids), self.config.rollout.max_response_len,
                                      algo.overlong_buffer, algo.overlong_penalty)
                     for r in rollouts]
        metrics["reward/overlong_penalty_mean"] = sum(penalties) / len(penalties)
        return [r + p for r, p in zip(rewards, penalties, strict=True)]

    def _generate(self, prompts: Sequence[Sequence[int]], round_: int) -> list[Rollout]:
        """Every rank samples its engine group's share; the whole batch ends on every rank."""
        cfg = self.config

        def params_for(group: int) -> SamplingParams:
            return SamplingParams(
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_response_len,
                stop_token_ids=(self.eos,),
                seed=step_seed(cfg.trainer.seed, self.step, round_, group))

        return generate_across_groups(self.engine, prompts, params_for, rank=self.rank,
                                      world=self.world, tp=cfg.rollout.tp)

    def samples_of(self, batch: StepBatch) -> tuple[list[TrainSample], dict[str, float]]:
        cfg = self.config
        correct = cfg.algo.rollout_correction.mode != "off"  # keep the engine's log-probs
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        advantages = compute_advantages(cfg.algo.advantage, rewards,
                                        group_size=cfg.rollout.n_samples)
        samples = []
        for r, a in zip(batch.rollouts, advantages, strict=True):
            tokens = r.token_ids
            n, p = len(tokens), len(r.prompt_ids)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[p:] = True
            old = torch.zeros(n, dtype=torch.float32)
            old[p:] = r.logprobs
            routes = None
            if self.policy.replay_mode == "r3" and r.routed_experts is not None:
                routes = align_routes(r.routed_experts, n, self.policy.topk)
            samples.append(TrainSample(tokens=tokens, loss_mask=mask, advantages=a.clone(),
                                       old_logprobs=old, routed_experts=routes,
                                       rollout_logprobs=old.clone() if correct else None))
        return samples, {"advantage/abs_mean": float(advantages.abs().mean())}

    def _mismatch(self, rollouts: list[Rollout], samples: list[TrainSample]) -> dict[str, float]:
        train = torch.cat([s.old_logprobs[len(r.prompt_ids):] for r, s in
                           zip(rollouts, samples, strict=True)])
        engine = torch.cat([r.logprobs for r in rollouts])
        return logprob_mismatch(train, engine, torch.ones_like(train, dtype=torch.bool))

    # ---- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.prompts.state_dict(),
                "bad_updates_in_a_row": self.bad_updates_in_a_row}

    def save(self) -> None:
        """This step's checkpoint; never one of a policy that is not finite."""
        problem = self.policy.nonfinite_state()
        if problem is not None:
            raise RunStopped(f"step {self.step}: {problem}; not writing its checkpoint")
        save_checkpoint(self.ckpt_dir, self.step, self.policy, self.state(),
                        self.config.checkpoint.keep_last)

    def save_hf(self) -> Path:
        """The final policy as an HF checkpoint in ``<run dir>/hf`` (``checkpoint.save_hf``)."""
        out = self.run_dir / "hf"
        tokenizer = self.config.model.tokenizer or self.config.model.name_or_path
        self.policy.save_hf(out, tokenizer_from=None if is_toy(tokenizer) else tokenizer)
        return out

    def _resume_point(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names, verified: 'auto' is the newest intact
        checkpoint of this run (none: a fresh start; damaged newer ones are set aside), a path
        is that checkpoint (damaged: a UserError), 'never' starts afresh."""
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            return resume_point(self.ckpt_dir)
        path = Path(resume)
        check_checkpoint(path)
        return path

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.policy, verified=True)
        self.step = int(state["step"])
        self.prompts.load_state_dict(state["data"])
        self.bad_updates_in_a_row = int(state.get("bad_updates_in_a_row", 0))
        if self.rank == 0:
            print(f"resuming from {path} (step {self.step})", flush=True)
