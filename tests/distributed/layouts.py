"""Megatron layouts vs the single-rank run, on CPU with gloo (megarl/megatron/cpu.py).

    python tests/distributed/layouts.py reference OUT.pt
    torchrun --standalone --nproc_per_node=N tests/distributed/layouts.py compare REF.pt LAYOUT...

``reference`` (one rank) builds the tiny Qwen3-MoE, draws the samples, and records per loss the
loss, per-token log-probs and entropy, every gradient, the grad norm and the parameters after one
Adam step; it also checks that 1, 2 and 4 micro-batches give the same loss, gradients and
parameters. ``compare`` runs each LAYOUT (tp2, pp2, pp2vpp2, ep2, dp2, tp2ep2, tp2pp2, pp2ep2,
tp2pp2ep2, cp2loss) from the same full weights and asserts equality to ``TOL``. Models have
megarl's grouped-GEMM experts (megarl/megatron/experts.py), the default without TE, except
``ep2seq``: megatron's SequentialMLP under EP2 against the grouped single-rank reference.
Each case prints one line ``CASE <layout> <loss> PASS|FAIL <worst errors>``; the exit code is
non-zero on any failure.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)  # megatron's per-model deprecation / layout notices
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megarl.megatron import cpu as cpu_shim  # noqa: E402

cpu_shim.install()
if os.environ.get("MEGARL_DUMP_AFTER"):  # a hang prints every thread's stack after N seconds
    faulthandler.dump_traceback_later(int(os.environ["MEGARL_DUMP_AFTER"]))


from megarl.config import ModelFacts, ParallelConfig, TrainerConfig  # noqa: E402
from megarl.losses import Objective, RolloutCorrection  # noqa: E402
from megarl.megatron.loss import (  # noqa: E402
    GlobalCounts,
    gather_from_context_parallel,
    policy_loss_share,
)
from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp  # noqa: E402
from megarl.megatron.optimizer import build_optimizer  # noqa: E402
from megarl.megatron.packing import cp_partition_index, make_micro_batches  # noqa: E402
from megarl.megatron.parallel import (  # noqa: E402
    destroy_parallel,
    init_process_group,
    initialize_parallel,  # noqa: E402
)
from megarl.megatron.step import (  # noqa: E402
    ForwardOptions,
    attach_schedule_hooks,
    compute_logprobs,
    train_step,
)
from megarl.policy_io import TrainSample  # noqa: E402
from tests.distributed.tiny_moe import (  # noqa: E402
    TINY_QWEN3_MOE,
    load_full_state,
    local_names,
    named_tensors,
    sharded,
)

TOL = 1e-5
NUM_SAMPLES = 8
OPTIONS = ForwardOptions(temperature=0.7, chunk_size=16)
TRAINER = TrainerConfig(lr=1e-2, grad_clip=1.0, weight_decay=0.0)
ADAM_EPS = 1e-4  # grads ~1e-3: a tiny eps makes Adam's first step a sign(), fragile to rounding


def objective(name: str, agg: str, **extra) -> Objective:
    return Objective.resolve(name, agg=agg, **extra)


LOSSES: dict[str, Objective] = {
    # with token TIS against a mismatched engine: the correction is split-invariant too
    "dapo-token-mean": objective("dapo", "token-mean",
                                 rollout_correction=RolloutCorrection.resolve("token_tis",
                                                                              upper=1.2)),
    "grpo-seq-mean": objective("grpo", "seq-mean-token-mean", kl_beta=0.05),
    "gspo": objective("gspo", "seq-mean-token-mean"),
    "up_gspo": objective("up_gspo", "seq-mean-token-mean", entropy_coef=0.01),
}
LAYOUTS = {
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "pp2vpp2": dict(pp=2, vpp=2),
    "ep2": dict(ep=2),
    "dp2": dict(),
    "tp2ep2": dict(tp=2, ep=2),
    "tp2pp2": dict(tp=2, pp=2),
    "pp2ep2": dict(pp=2, ep=2),
    "tp2pp2ep2": dict(tp=2, pp=2, ep=2),
    "ep2seq": dict(ep=2),  # megatron's SequentialMLP experts against the grouped reference
}
SEQUENTIAL_EXPERTS = {"ep2seq"}  # every other layout (and the reference) has grouped experts
FACTS = ModelFacts.from_hf(TINY_QWEN3_MOE)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def make_samples(seed: int = 0) -> list[TrainSample]:
    """Variable-length samples: a prompt (not trained) then a response (trained)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(NUM_SAMPLES):
        prompt, response = 3 + i % 4, 5 + (7 * i) % 11
        n = prompt + response
        mask = torch.zeros(n, dtype=torch.bool)
        mask[prompt:] = True
        adv = float(torch.randn((), generator=g)) if i % 5 else 0.0  # includes a zero advantage
        samples.append(TrainSample(tokens=torch.randint(0, 128, (n,), generator=g),
                                   loss_mask=mask, advantages=torch.tensor(adv)))
    return samples


def build(parallel: ParallelConfig, full_state: dict[str, torch.Tensor] | None,
          grouped_experts: bool | None = None):
    config = transformer_config_from_hf(TINY_QWEN3_MOE, parallel, dtype="float32",
                                        use_transformer_engine=False)
    chunks = build_model(config, TINY_QWEN3_MOE, use_transformer_engine=False,
                         grouped_experts=grouped_experts)
    if full_state is not None:
        load_full_state(chunks, full_state)
    models = wrap_ddp(chunks, config)
    attach_schedule_hooks(models)
    optimizer = build_optimizer(models, TRAINER, params_dtype=torch.float32, adam_eps=ADAM_EPS)
    return models, optimizer


def full_params(models) -> dict[str, torch.Tensor]:
    out = {}
    for model in models:
        names = local_names(model)
        for name, p in named_tensors(model):
            out[names[name]] = p.detach().clone()
    return out


def run_step(models, optimizer, micro_batches, spec):
    grads: dict[str, torch.Tensor] = {}

    def keep(ms):
        for model in ms:
            names = local_names(model)
            for name, g in named_tensors(model, lambda p: p.main_grad):
                grads[names[name]] = g.detach().clone()

    result = train_step(models, optimizer, micro_batches, spec, OPTIONS, on_grads=keep)
    return result, grads, full_params(models)


def with_old_logprobs(samples, rows, micro_batches, seed: int = 1):
    """Samples whose old/ref log-probs are the model's own plus noise (ratios != 1, clipping)."""
    g = torch.Generator().manual_seed(seed)
    out, k = [], 0
    for mb, row in zip(micro_batches, rows, strict=True):
        for start, length in zip(mb.sample_starts, mb.sample_lengths, strict=True):
            s = samples[k]
            lp = torch.zeros(length)
            lp[1:] = row[start:start + length - 1]  # label-aligned -> token-aligned
            noise = 0.3 * torch.randn(length, generator=g)
            ref = lp + 0.1 * torch.randn(length, generator=g)
            engine = lp + noise + 0.3 * torch.randn(length, generator=g)  # a mismatched engine
            out.append(TrainSample(s.tokens, s.loss_mask, s.advantages, lp + noise, ref,
                                   rollout_logprobs=engine))
            k += 1
    return out


# --------------------------------------------------------------------------------------------
def reference(out_path: str, conversions: list[str]) -> None:
    init_process_group("gloo", timeout_s=120)
    t0 = time.time()
    parallel = ParallelConfig()
    initialize_parallel(parallel, FACTS, seed=1234)
    models, _ = build(parallel, None)
    with torch.no_grad():  # non-trivial norm weights so that a wrong norm mapping shows
        g = torch.Generator().manual_seed(5)
        for name, p in models[0].named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    state = full_params(models)

    samples = make_samples()
    mbs = make_micro_batches(samples, num_micro_batches=1)
    rows = compute_logprobs(models, mbs, OPTIONS, with_entropy=True)
    samples = with_old_logprobs(samples, [r[:, 0] for r in rows], mbs)
    mbs = make_micro_batches(samples, num_micro_batches=1)
    rows = compute_logprobs(models, mbs, OPTIONS, with_entropy=True)
    record = {"state": state, "samples": samples, "rows": [mbs[0].unpack(rows[0][:, 0]),
              mbs[0].unpack(rows[0][:, 1])], "losses": {}}
    ok = True
    for loss_name, spec in LOSSES.items():
        results = []
        for n_mb in (1, 2, 4):
            initialize_parallel(parallel, FACTS, seed=1234)
            models, optimizer = build(parallel, state)
            split = make_micro_batches(samples, num_micro_batches=n_mb)
            results.append(run_step(models, optimizer, split, spec))
        base = results[0]
        for n_mb, other in zip((2, 4), results[1:], strict=True):
            errs = compare_results(base, other, full=True)
            passed = max(errs.values()) <= TOL
            ok &= passed
            log(f"CASE microbatches{n_mb} {loss_name} {'PASS' if passed else 'FAIL'} "
                + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
        res, grads, params = base
        record["losses"][loss_name] = {
            "loss": res.metrics["loss/total"], "grad_norm": res.grad_norm, "grads": grads,
            "params": params, "metrics": res.metrics,
        }
    ok &= check_nonfinite_skip(parallel, state, samples, record["losses"]["gspo"])
    torch.save(record, out_path)
    log(f"reference written in {time.time() - t0:.1f}s")
    destroy_parallel()
    ok &= compare_conversions([c for c in conversions if c.startswith("convert-")])
    ok &= compare_replays([c for c in conversions if c.startswith("replay-")])
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


def check_nonfinite_skip(parallel, state, samples, expected) -> bool:
    """A NaN gradient skips the update and leaves no trace: the next good step equals the
    reference's first step (same params, Adam state untouched by the skipped step)."""
    initialize_parallel(parallel, FACTS, seed=1234)
    models, optimizer = build(parallel, state)
    poisoned = [TrainSample(s.tokens, s.loss_mask, s.advantages, s.old_logprobs, s.ref_logprobs)
                for s in samples]
    poisoned[1].advantages = torch.tensor(float("nan"))
    bad = train_step(models, optimizer, make_micro_batches(poisoned, num_micro_batches=2),
                     LOSSES["gspo"], OPTIONS)
    unchanged = max(float((p - state[k]).abs().max()) for k, p in full_params(models).items())
    good, _, params = run_step(models, optimizer, make_micro_batches(samples, num_micro_batches=1),
                               LOSSES["gspo"])
    errs = {
        "skipped": 0.0 if bad.skipped and bad.metrics["train/skipped_update"] == 1.0 else 1.0,
        "unchanged": unchanged,
        "next_step_params": max(float((params[k] - v).abs().max())
                                for k, v in expected["params"].items()),
        "next_step_skipped": float(good.skipped),
    }
    return report("nonfinite-skip", "gspo", errs, 0.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-3))


def compare_results(ref, other, full: bool) -> dict[str, float]:
    """Worst errors between two (StepResult, grads, params) triples."""
    res_a, grads_a, params_a = ref
    res_b, grads_b, params_b = other
    return {
        "loss": abs(res_a.metrics["loss/total"] - res_b.metrics["loss/total"]),
        "grad_norm": abs(res_a.grad_norm - res_b.grad_norm) / max(res_a.grad_norm, 1e-6),
        "grads": max(_rel(grads_b[k], grads_a[k]) for k in grads_a),
        "params": max(float((params_b[k] - params_a[k]).abs().max()) for k in params_a),
    }


# --------------------------------------------------------------------------------------------
def compare_layout(layout: str, ref: dict) -> bool:
    sizes = LAYOUTS[layout]
    parallel = ParallelConfig(**sizes)
    samples = ref["samples"]
    ok = True
    first = True
    for loss_name, spec in LOSSES.items():
        t0 = time.time()
        lay = initialize_parallel(parallel, FACTS, seed=1234)
        models, optimizer = build(parallel, ref["state"],
                                  grouped_experts=layout not in SEQUENTIAL_EXPERTS)
        mine = samples[lay.dp_rank::lay.dp]  # DP: each replica trains on its own samples
        n_mb = 2 if len(mine) >= 2 else 1
        if sizes.get("vpp"):  # more micro-batches than pp: the interleaved schedule's steady
            n_mb = 4  # state, where batched p2p once crossed activations and gradients
        micro_batches = make_micro_batches(mine, num_micro_batches=n_mb,
                                           row_multiple=lay.tp)
        errs: dict[str, float] = {}
        if first:  # log-probs and entropy, forward-only (once per layout)
            rows = compute_logprobs(models, micro_batches, OPTIONS, with_entropy=True)
            ref_lp, ref_ent = ref["rows"]
            ref_lp, ref_ent = ref_lp[lay.dp_rank::lay.dp], ref_ent[lay.dp_rank::lay.dp]
            k, e_lp, e_ent = 0, 0.0, 0.0
            for mb, row in zip(micro_batches, rows, strict=True):
                lp, ent = mb.unpack(row[:, 0]), mb.unpack(row[:, 1])
                n, width = lp.shape
                e_lp = max(e_lp, float((lp - ref_lp[k:k + n, :width]).abs().max()))
                e_ent = max(e_ent, float((ent - ref_ent[k:k + n, :width]).abs().max()))
                k += n
            errs.update(logprobs=e_lp, entropy=e_ent)
            first = False
        result, grads, params = run_step(models, optimizer, micro_batches, spec)
        expected = ref["losses"][loss_name]
        errs["loss"] = abs(result.metrics["loss/total"] - expected["loss"])
        errs["grad_norm"] = abs(result.grad_norm - expected["grad_norm"]) / expected["grad_norm"]
        want_grads = sharded(models, expected["grads"])
        want_params = sharded(models, expected["params"])
        errs["grads"] = max(_rel(grads[k], want_grads[k]) for k in want_grads)
        errs["params"] = max(float((params[k] - want_params[k]).abs().max()) for k in want_params)
        ok &= report(layout, loss_name, errs, time.time() - t0)
    destroy_parallel()
    return ok


def report(layout: str, loss_name: str, errs: dict[str, float], seconds: float) -> bool:
    worst = torch.tensor([max(errs.values())], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    passed = bool(worst.item() <= TOL)
    log(f"CASE {layout} {loss_name} {'PASS' if passed else 'FAIL'} "
        + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f" ({seconds:.1f}s)")
    return passed


def compare_cp_loss(ref: dict) -> bool:
    """Contract point 4 with real collectives: the CP gather gives whole sequences, and the
    per-rank shares and gradients add up to the single-rank loss and gradient."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    ok = True
    micro_batch = make_micro_batches(ref["samples"], num_micro_batches=1, seq_multiple=2 * cp,
                                     row_multiple=2 * cp)[0]
    g = torch.Generator().manual_seed(3)
    row = -2.0 * torch.rand(micro_batch.row_length, generator=g)
    entropy = torch.rand(micro_batch.row_length, generator=g)
    counts = GlobalCounts(micro_batch.num_tokens, micro_batch.num_sequences)
    for loss_name, spec in LOSSES.items():
        full = row.clone().requires_grad_()
        loss_full, _ = policy_loss_share(spec, counts, micro_batch, full, entropy)
        (grad_full,) = torch.autograd.grad(loss_full, full)
        index = cp_partition_index(micro_batch.cu_seqlens, cp, rank)
        local = row[index].clone().requires_grad_()
        gathered = gather_from_context_parallel(local, micro_batch.cu_seqlens, dist.group.WORLD)
        loss, _ = policy_loss_share(spec, counts, micro_batch, gathered, entropy)
        (loss / cp).backward()
        total = (loss / cp).detach().clone()
        dist.all_reduce(total)
        errs = {"loss": abs(float(total - loss_full)),
                "grads": _rel(local.grad, grad_full[index])}
        ok &= report(f"cp{cp}loss", loss_name, errs, 0.0)
    return ok


def compare_conversions(cases: list[str]) -> bool:
    """``convert-<model>-<layout>`` cases (tests/distributed/conversion_cases.py); the tiny HF
    checkpoints are in $MEGARL_TEST_HF_ROOT."""
    from tests.distributed.conversion_cases import passes, run_case

    if not cases:
        return True
    root = Path(os.environ["MEGARL_TEST_HF_ROOT"])
    ok, previous = True, {}
    for case in cases:
        _, model_type, layout = case.split("-", 2)
        t0 = time.time()
        errs = run_case(model_type, layout, root, previous.get(model_type))
        previous[model_type] = layout
        keys = sorted(errs)  # every rank has the same keys; rank 0 has no logits under PP
        worst = torch.tensor([errs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        errs = dict(zip(keys, worst.tolist(), strict=True))
        flag = torch.tensor([1.0 if passes(errs) else 0.0])
        log(f"CASE {case} hf {'PASS' if flag.item() else 'FAIL'} "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f" ({time.time() - t0:.1f}s)")
        ok &= bool(flag.item())
    return ok


def compare_replays(cases: list[str]) -> bool:
    """``replay-<layout>`` cases (tests/distributed/replay_cases.py)."""
    from tests.distributed.replay_cases import passes, run_case

    ok = True
    for case in cases:
        t0 = time.time()
        errs = run_case(case.removeprefix("replay-"), Path(os.environ["MEGARL_TEST_HF_ROOT"]))
        keys = sorted(errs)
        worst = torch.tensor([errs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        errs = dict(zip(keys, worst.tolist(), strict=True))
        good = passes(errs)
        log(f"CASE {case} r3 {'PASS' if good else 'FAIL'} "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + f" ({time.time() - t0:.1f}s)")
        ok &= good
    return ok


def compare(ref_path: str, layouts: list[str]) -> None:
    init_process_group("gloo", timeout_s=180)
    conversions = [c for c in layouts if c.startswith("convert-")]
    replays = [c for c in layouts if c.startswith("replay-")]
    layouts = [c for c in layouts if not c.startswith(("convert-", "replay-"))]
    ref = torch.load(ref_path, weights_only=False) if layouts else None
    ok = compare_conversions(conversions) & compare_replays(replays)
    for layout in layouts:
        if layout.startswith("cp") and layout.endswith("loss"):
            ok &= compare_cp_loss(ref)
        else:
            ok &= compare_layout(layout, ref)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "reference":
        reference(sys.argv[2], sys.argv[3:])
    elif mode == "compare":
        compare(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}: reference | compare")
