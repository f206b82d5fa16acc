"""Token-budget micro-batches against a fixed sequence count, DP2 on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 \\
        benchmarks/token_budget.py                     # writes benchmarks/results/
    ... benchmarks/token_budget.py --smoke --out /tmp/x.json

Two ranks train a Qwen3-MoE policy (`megarl.megatron.policy.Policy`, fp32, Adam) on the same
batch of sequences whose response lengths are long-tailed (log-normal, as RL responses are: most
short, a few near the limit), once per way of cutting it: ``trainer.micro_batch_size``
sequences per micro-batch (each rank a contiguous share, as before) and
``trainer.max_tokens_per_micro_batch`` (shares balanced by tokens, rows packed up to the
budget). For each: the median wall time of one optimizer update (`Policy.train`) over
``--repeats`` after a warm-up, the micro-batches, the longest row (what activation memory
scales with), the fraction of row tokens that are padding and the DP imbalance (the busiest
rank's row tokens over the mean: the others wait that long). The loss must be the same in every
cut (the test suite checks gradients; here the loss is recorded as a check). Prints a table
last; exit 0 when every cut gave the same loss.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_common_args, environment, finish, markdown_table  # noqa: E402

MODEL = {  # ~3 M parameters
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 2048,
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 2112, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SMOKE_MODEL = MODEL | {"hidden_size": 64, "num_experts": 4, "intermediate_size": 128,
                       "moe_intermediate_size": 32, "vocab_size": 256,
                       "max_position_embeddings": 512}


def response_lengths(count: int, limit: int, seed: int) -> list[int]:
    """Log-normal (median ~limit/8, sigma 1), capped at the limit: a long tail."""
    import random

    rng = random.Random(seed)
    return [max(8, min(limit, int(rng.lognormvariate(math.log(limit / 8), 1.0))))
            for _ in range(count)]


def make_batch(count: int, prompt: int, limit: int, vocab: int, seed: int) -> list[Any]:
    import torch

    from megarl.policy_io import TrainSample

    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in response_lengths(count, limit, seed):
        total = prompt + n
        mask = torch.zeros(total, dtype=torch.bool)
        mask[prompt:] = True
        batch.append(TrainSample(
            tokens=torch.randint(0, vocab, (total,), generator=g), loss_mask=mask,
            advantages=torch.randn((), generator=g),
            old_logprobs=-torch.rand(total, generator=g) - 1.0))
    return batch


def build_policy(hf_config: dict[str, Any], cut: dict[str, Any], count: int) -> Any:
    from megarl.config import Config, read_yaml
    from megarl.megatron.policy import Policy

    data = read_yaml(str(Path(__file__).resolve().parents[1] / "examples/configs/quickstart.yaml"))
    data["model"]["hf_config"] = dict(hf_config)
    data["model"]["routing_replay"] = "off"  # random tokens, no engine routes
    data["parallel"] = {"world_size": 2, "dp": 2}
    data["rollout"] |= {"max_prompt_len": 64, "max_response_len": hf_config[
        "max_position_embeddings"] - 64}
    data["trainer"] |= {"mini_batch_size": count, "prompts_per_step": count // 8, **cut}
    config = Config.from_dict(data)
    return config, Policy(config, hf_config)


def measure(hf_config: dict[str, Any], cut: dict[str, Any], batch: list[Any],
            repeats: int) -> dict[str, Any]:  # fmt: skip
    import torch.distributed as dist

    from megarl.megatron.parallel import destroy_parallel

    config, policy = build_policy(hf_config, cut, len(batch))
    objective = config.algo.objective(norm_length=config.rollout.max_response_len)
    result = policy.train(batch, objective, 1e-5)  # warm-up; creates Adam's state
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        result = policy.train(batch, objective, 1e-5)
        dist.barrier()
        times.append(time.perf_counter() - start)
    destroy_parallel()
    stats = {k.removeprefix("batch/"): v for k, v in result.metrics.items()
             if k.startswith("batch/")}
    return {"cut": cut, "step_s": statistics.median(times), "times_s": times,
            "loss": result.metrics["loss/total"], **stats}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megarl.megatron.policy import start_distributed

    start_distributed()
    hf_config = SMOKE_MODEL if args.smoke else MODEL
    limit = hf_config["max_position_embeddings"] - 64
    batch = make_batch(args.sequences, 64, limit, hf_config["vocab_size"], seed=0)
    lengths = [len(s.tokens) for s in batch]
    cuts = [{"micro_batch_size": m} for m in args.counts] + [
        {"max_tokens_per_micro_batch": b} for b in args.budgets]
    results = [measure(hf_config, cut, batch, args.repeats) for cut in cuts]
    return {
        "environment": environment() | {"ranks": 2, "omp_num_threads":
                                        os.environ.get("OMP_NUM_THREADS")},
        "model": hf_config, "sequences": len(batch), "repeats": args.repeats,
        "lengths": {"total_tokens": sum(lengths), "min": min(lengths), "max": max(lengths),
                    "median": statistics.median(lengths), "mean": sum(lengths) / len(lengths)},
        "results": results,
    }


def table(record: dict[str, Any]) -> str:
    base = record["results"][0]["step_s"]
    rows = []
    for r in record["results"]:
        ((key, value),) = r["cut"].items()
        name = (f"{value} sequences / micro-batch" if key == "micro_batch_size"
                else f"<= {value} tokens / micro-batch")
        rows.append([name, f"{r['step_s']:.2f}", f"{base / r['step_s']:.2f}x",
                     int(r["micro_batches"]), int(r["row_tokens/max"]),
                     f"{100 * r['padding_frac']:.1f} %", f"{r['dp_imbalance']:.3f}",
                     f"{r['loss']:.6f}"])
    return markdown_table(rows, ["cut (DP2)", "update (s)", "speed-up", "micro-batches",
                                 "longest row", "padding", "DP imbalance", "loss"])


def same_loss(record: dict[str, Any]) -> bool:
    losses = [r["loss"] for r in record["results"]]
    return max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--counts", type=int, nargs="+", default=None)
    parser.add_argument("--budgets", type=int, nargs="+", default=None)
    add_common_args(parser, "a tiny model and batch, one repeat")
    args = parser.parse_args()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if not rank0:  # every rank measures; rank 0 writes and prints
        args.out = Path(os.devnull)
    return finish("token_budget", args, run, table if rank0 else (lambda record: ""),
                  same_loss, smoke={"sequences": 16, "repeats": 1, "counts": [4],
                                    "budgets": [512]},
                  full={"sequences": 64, "repeats": 3, "counts": [4, 8],
                        "budgets": [2048, 4096]},
                  failure="the cuts gave different losses")


if __name__ == "__main__":
    sys.exit(main())
