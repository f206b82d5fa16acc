"""Token-budget micro-batches through the real `Policy`, under torchrun on CPU (gloo).

For each layout (DP2 with R2 routing replay, PP2, PP2 x VPP2) and each token budget, a fresh
`Policy` from the same seed computes the old log-probs of one batch and takes one optimizer step
on it; every result is compared with the fixed-count run (``trainer.micro_batch_size``) of the
same layout. The batch is long-tailed on purpose: one sequence is as long as the other fifteen
together, so the budget's DP balancing gives one rank a single sequence and the other fifteen,
and the rank with fewer micro-batches pads with empty rows.

Prints ``CASE <layout> budget<N> PASS|FAIL <errors>``; tests/distributed/test_token_budget.py
reads them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megarl.config import Config, load_config  # noqa: E402
from megarl.megatron.parallel import destroy_parallel  # noqa: E402
from megarl.megatron.policy import Policy, start_distributed  # noqa: E402
from megarl.policy_io import TrainSample  # noqa: E402

QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"
TOL = 1e-6  # log-probs, loss, gradient norm
GRAD_TOL = 5e-6  # whole gradients, relative to each tensor's largest entry: float32 sums of
# the same tokens in another order (one row of 200 tokens, or four of 48) differ by a few ulps
BUDGETS = tuple(int(b) for b in os.environ.get("BUDGETS", "24 64 200").split())
LAYOUTS = {
    "dp2": ["parallel.dp=2", "model.routing_replay=r2"],
    "pp2": ["parallel.pp=2", "model.routing_replay=off"],
    "pp2vpp2": ["parallel.pp=2", "parallel.vpp=2", "model.hf_config.num_hidden_layers=4",
                "model.routing_replay=off"],
}


def make_samples(seed: int = 0) -> list[TrainSample]:
    """Sixteen sequences: one of 120 tokens, fifteen of 8 (prompt 4, response the rest)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in [8] * 7 + [120] + [8] * 8:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[4:] = True
        samples.append(TrainSample(tokens=torch.randint(0, 32, (n,), generator=g), loss_mask=mask,
                                   advantages=torch.randn((), generator=g)))
    return samples


def config(layout: str, budget: int | None) -> Config:
    extra = [] if budget is None else [f"trainer.max_tokens_per_micro_batch={budget}"]
    return load_config(QUICKSTART, ["parallel.world_size=2", "trainer.micro_batch_size=4",
                                    "trainer.mini_batch_size=16", "trainer.prompts_per_step=2",
                                    *LAYOUTS[layout], *extra])


def run(layout: str, budget: int | None, samples: list[TrainSample],
        trained: list[TrainSample] | None) -> dict:  # fmt: skip
    cfg = config(layout, budget)
    policy = Policy(cfg, cfg.model.known_config())
    before = [p.detach().clone() for p in policy._parameters()]
    with_old = policy.logprobs(samples)
    cut = policy.cut(samples)
    counts: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, len(cut.micro_batches[policy.layout.dp_rank]))
    capacity = budget  # cp = 1: a row holds the budget
    over = []
    for rows, groups in zip(cut.row_lengths, cut.micro_batches, strict=True):
        for row, group in zip(rows, groups, strict=True):
            if capacity is not None and row > capacity and len(group) > 1:
                over.append((row, group))
    grads: list[torch.Tensor] = []

    def keep(models) -> None:  # the whole reduced gradients, before the optimizer step
        grads.extend(p.main_grad.detach().clone() for m in models for p in m.module.parameters())

    result = policy.train(trained or with_old, cfg.objective(), cfg.trainer.lr, on_grads=keep)
    after = [p.detach().clone() for p in policy._parameters()]
    destroy_parallel()
    return {"old": with_old, "result": result, "before": before, "after": after, "grads": grads,
            "counts": counts, "over": over, "padding_rows": sum(
                not g for groups in cut.micro_batches for g in groups)}


def compare(layout: str) -> bool:
    samples = make_samples()
    ref = run(layout, None, samples, None)
    ok = True
    for budget in BUDGETS:
        got = run(layout, budget, samples, ref["old"])
        errs = {
            "init": max(float((a - b).abs().max()) for a, b in zip(ref["before"], got["before"],
                                                                    strict=True)),
            "old_logprobs": max(float((a.old_logprobs - b.old_logprobs).abs().max())
                                for a, b in zip(ref["old"], got["old"], strict=True)),
            "loss": abs(ref["result"].metrics["loss/total"] - got["result"].metrics["loss/total"]),
            "grad_norm": abs(ref["result"].grad_norm - got["result"].grad_norm)
            / ref["result"].grad_norm,
            # the loss's metrics (regions, gradient weights, ratios, clip fractions): the same
            # step, whatever the cut (padding rows and region counts weigh right)
            "metrics": max(abs(v - got["result"].metrics[k]) / max(abs(v), 1.0)
                           for k, v in ref["result"].metrics.items()
                           if k.startswith(("region/", "grad_weight/", "ratio/", "clip/",
                                            "kl/", "up/", "loss/"))),
            "grads": max(float((a - b).abs().max() / max(float(a.abs().max()), 1e-3))
                         for a, b in zip(ref["grads"], got["grads"], strict=True)),
        }
        worst_metric = max(
            (abs(v - got["result"].metrics[k]) / max(abs(v), 1.0), k)
            for k, v in ref["result"].metrics.items()
            if k.startswith(("region/", "grad_weight/", "ratio/", "clip/", "kl/", "up/", "loss/")))
        routes_equal = all(
            a.routed_experts is None or torch.equal(a.routed_experts, b.routed_experts)
            for a, b in zip(ref["old"], got["old"], strict=True))
        same_count = len(set(got["counts"])) == 1
        worst = torch.tensor([max(v for k, v in errs.items() if k != "grads"), errs["grads"]],
                             dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        within = bool(worst[0] <= TOL) and bool(worst[1] <= GRAD_TOL)
        passed = (within and same_count and not got["over"] and routes_equal
                  and not got["result"].skipped)
        ok &= passed
        if dist.get_rank() == 0:
            print(f"CASE {layout} budget{budget} {'PASS' if passed else 'FAIL'} "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + f" micro_batches={got['counts']} padding_rows={got['padding_rows']}"
                  + f" over_budget={got['over']} routes_equal={routes_equal}"
                  + f" worst_metric={worst_metric[1]}"
                  + f" metrics={ {k: v for k, v in got['result'].metrics.items()
                                  if k.startswith('batch/')} }", flush=True)
    return ok


def main(layouts: list[str]) -> None:
    start_distributed()
    ok = True
    for layout in layouts:
        ok &= compare(layout)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
