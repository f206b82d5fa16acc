"""Sampling-based evaluation: ``eval.k`` samples per problem of every ``data.eval`` benchmark,
graded by the run's reward, summarised as avg@k, maj@k and pass@k (unbiased, Chen et al. 2021).

The same `Evaluator` runs inside training (every ``trainer.eval_every`` steps, on the engine the
step just synced) and behind ``megarl eval`` on a checkpoint (`evaluate_checkpoint`). Sampling is
seeded per benchmark and engine group, so an evaluation is repeatable.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megarl.assemble import (
    Rewards,
    build_prompt_source,
    eval_checkpoint_dir,
    model_source,
    split_source,
)
from megarl.config import Config
from megarl.errors import UserError
from megarl.eval_metrics import ProblemResult
from megarl.rollout.engine import RolloutEngine, SamplingParams
from megarl.rollout.groups import generate_across_groups

TOY_PROBLEMS = 64  # a toy task is endless: its benchmark is its first problems
EVAL_SEED_OFFSET = 1_000_003  # toy eval problems are drawn away from the training stream


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompts: list[Any]  # items with ``prompt_ids`` and ``answer``


def load_benchmark(config: Config, tokenizer: Any, entry: str) -> Benchmark:
    from megarl.data.toy import ToySource, is_toy

    limit = config.eval.max_problems
    if is_toy(entry):
        source = ToySource(entry, tokenizer, config.trainer.seed + EVAL_SEED_OFFSET)
        return Benchmark(entry, source.next_batch(limit or TOY_PROBLEMS))
    from megarl.data.gym import is_gym

    if is_gym(entry):  # the held-out split, eval.max_problems distinct problems
        dataset = build_prompt_source(config, tokenizer, source=entry, split="test",
                                      field="data.eval")
        return Benchmark(entry, list(dataset))
    source, split = split_source(entry)
    dataset = build_prompt_source(config, tokenizer, source=source, split=split,
                                  shuffle=False, field="data.eval")
    return Benchmark(getattr(dataset, "name", source), list(itertools.islice(dataset, limit)))


class Evaluator:
    """Samples, grades and summarises ``data.eval`` with one engine."""

    def __init__(self, config: Config, tokenizer: Any, rewards: Rewards, *, rank: int = 0,
                 world: int = 1) -> None:  # fmt: skip
        self.config, self.tokenizer, self.rewards = config, tokenizer, rewards
        self.rank, self.world = rank, world
        self.benchmarks = [load_benchmark(config, tokenizer, e) for e in config.data.eval]
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise UserError(f"data.eval names a benchmark twice ({names}): list each once")

    def sampling(self, benchmark: int, group: int) -> SamplingParams:
        cfg, r = self.config.eval, self.config.rollout
        return SamplingParams(
            temperature=cfg.temperature if cfg.temperature is not None else r.temperature,
            top_p=cfg.top_p if cfg.top_p is not None else r.top_p, top_k=r.top_k,
            max_tokens=cfg.max_response_len or r.max_response_len,
            stop_token_ids=(int(self.tokenizer.eos_token_id),),
            seed=(self.config.trainer.seed * 7919 + benchmark * 104_729 + group) % 2**62)

    def results(self, engine: RolloutEngine) -> list[ProblemResult]:
        """Every problem's ``eval.k`` answers and their grades, and with ``eval.greedy`` its
        greedy decode (collective over the job)."""
        k = self.config.eval.k
        out: list[ProblemResult] = []
        for b, bench in enumerate(self.benchmarks):
            texts, answers, correct = self._graded(engine, bench, k, lambda g, b=b:
                                                   self.sampling(b, g))
            greedy: tuple[list[Any], ...] = ([None] * len(bench.prompts),) * 3
            if self.config.eval.greedy:
                greedy = self._graded(engine, bench, 1, lambda g, b=b: dataclasses.replace(
                    self.sampling(b, g), temperature=0.0, top_p=1.0, top_k=-1))
            for i, p in enumerate(bench.prompts):
                span = slice(i * k, (i + 1) * k)
                out.append(ProblemResult(bench.name, int(p.index), tuple(answers[span]),
                                         tuple(correct[span]), greedy[0][i], greedy[1][i],
                                         greedy[2][i]))
        return out

    def _graded(self, engine: RolloutEngine, bench: Benchmark, k: int, sampling: Any,
                ) -> tuple[list[str], list[str | None], list[bool]]:  # fmt: skip
        """``k`` responses per problem: texts, extracted answers, correctness (reward > 0.5)."""
        prompts = [p.prompt_ids for p in bench.prompts for _ in range(k)]
        rollouts = generate_across_groups(engine, prompts, sampling, rank=self.rank,
                                          world=self.world, tp=self.config.rollout.tp)
        texts = [self.tokenizer.decode(r.response_ids.tolist()) for r in rollouts]
        golds = [p.answer for p in bench.prompts for _ in range(k)]
        rewards, _ = self.rewards(texts, golds)
        return texts, [self.rewards.answer_of(t) for t in texts], [r > 0.5 for r in rewards]


def evaluate_checkpoint(config: Config, checkpoint: str | Path | None) -> list[ProblemResult]:
    """``megarl eval``: load the policy (a megarl ``step_*`` checkpoint or run directory, an HF
    checkpoint directory, or ``model.name_or_path`` when None), sync it into the engine and
    sample and grade ``data.eval`` (summarise the results with `eval_metrics.summarise`)."""
    if not config.data.eval:
        raise UserError("data.eval is empty: name the benchmarks to evaluate, e.g. "
                        "data.eval=[toy:arithmetic] or a dataset path")
    from megarl.assemble import build_engine, build_tokenizer, prepare_engine_platform

    prepare_engine_platform(config)
    import torch.distributed as dist

    from megarl.megatron.policy import Policy
    from megarl.rollout.sync import sync_weights
    from megarl.run_checkpoints import latest_checkpoint, load_checkpoint

    megarl_step = None
    if checkpoint is not None:
        path = eval_checkpoint_dir(checkpoint)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        megarl_step = latest_checkpoint(path) if path.name == "checkpoints" else None
        if megarl_step is None and (path / "policy").is_dir():
            megarl_step = path
        if megarl_step is None:  # an HF checkpoint
            config.model.name_or_path, config.model.random_init = str(path), False
    tokenizer = build_tokenizer(config)
    rewards = Rewards(config)
    try:
        hf_config, hf_checkpoint = model_source(config)
        policy = Policy(config, hf_config, hf_checkpoint)
        rank, world = dist.get_rank(), dist.get_world_size()
        evaluator = Evaluator(config, tokenizer, rewards, rank=rank, world=world)
        if megarl_step is not None:
            load_checkpoint(megarl_step, policy)
        engine = build_engine(config, hf_config, rank=rank, world_size=world,
                              moe_layers=policy.arch.moe_layers,
                              num_experts=policy.arch.num_experts)
        sync_weights(policy.hf_weights(), engine,
                     bucket_bytes=config.rollout.sync_bucket_bytes)
        return evaluator.results(engine)
    finally:
        rewards.close()
