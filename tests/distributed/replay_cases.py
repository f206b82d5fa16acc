"""Rollout routing replay (R3) checks, run inside the launches of tests/distributed/layouts.py.

For the tiny Qwen3-MoE of conversion_cases and a layout: the transformers engine samples
responses (same seed on every rank), Megatron loads the same HF weights with routing replay on
and computes the responses' log-probs from packed, padded micro-batches with the engine's routes
installed:
- `logp`: equal to the engine's log-probs (1e-5, fp32) and no disagreement reported;
- after perturbing Megatron's router weights (its own routing now differs on some routes):
  `logp_perturbed` equals an un-cached transformers forward with the same perturbed router and
  the recorded routes forced (so the replay used exactly the recorded experts), the
  disagreement metric equals the true fraction over the routed rows, and a replayed training
  step gives every router weight a gradient;
- R2: Megatron records its own routes in a forward pass (whole rows reassembled across SP /
  CP / PP); unperturbed they equal the engine's, perturbed they equal transformers' own top-k
  under the same routers, and replaying them reproduces the recording pass (no disagreement);
- after that optimizer step, a bucketed sync (wake weights, one streamed load, wake KV cache)
  leaves every engine tensor equal to the gathered Megatron tensor, and the exported tensors
  alive at any time stay within one bucket (plus the tensor that overflowed it and the one
  being loaded), far below the model's size.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megarl.config import ModelFacts, ParallelConfig, TrainerConfig
from megarl.convert.hf_io import HFCheckpoint
from megarl.convert.mapping import Architecture
from megarl.losses import Objective
from megarl.megatron.model import build_model, transformer_config_from_hf, wrap_ddp
from megarl.megatron.optimizer import build_optimizer
from megarl.megatron.packing import make_micro_batches
from megarl.megatron.parallel import destroy_parallel, initialize_parallel
from megarl.megatron.router_replay import (
    RouteRecorder,
    RouteReplayer,
    sample_routes,
)
from megarl.megatron.step import (
    ForwardOptions,
    attach_schedule_hooks,
    compute_logprobs,
    train_step,
)
from megarl.megatron.weights import export_hf_weights, load_hf_weights
from megarl.policy_io import TrainSample
from megarl.rollout.engine import SamplingParams
from megarl.rollout.hf import HFEngine
from megarl.rollout.sync import sync_weights
from megarl.routes import align_routes
from tests.distributed.conversion_cases import LAYOUTS

TOL = 1e-5
NOISE = 0.03  # router weight noise: own routing then differs on a fraction of the routes
TEMPERATURE = 0.7
PROMPTS = [[5, 9, 11], [7, 1], [3, 4, 5, 6, 8, 10, 12], [2, 2, 2, 2], [40, 41], [17, 3, 60]]


def samples_of(batch, topk: int = 2) -> list[TrainSample]:
    """Rollouts -> TrainSamples (responses masked in, advantage 1) with token-aligned routes."""
    out = []
    for r in batch.rollouts:
        tokens = r.token_ids
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        mask[len(r.prompt_ids):] = True
        out.append(TrainSample(tokens=tokens, loss_mask=mask, advantages=torch.tensor(1.0),
                               routed_experts=align_routes(r.routed_experts, len(tokens), topk)))
    return out


def _response_logprobs(rows, mbs, samples) -> list[torch.Tensor]:
    """Per sample: the log-probs of its response tokens (label-aligned rows -> tokens)."""
    out = []
    for row, mb in zip(rows, mbs, strict=True):
        unpacked = mb.unpack(row)
        for k in range(len(mb.sample_lengths)):
            out.append(unpacked[k])
    result = []
    for s, values in zip(samples, out, strict=True):
        start = int(torch.nonzero(s.loss_mask)[0]) - 1
        result.append(values[start: len(s.tokens) - 1])
    return result


def _forced(engine: HFEngine, samples: list[TrainSample]):
    """Un-cached transformers forward with each router's choice forced to the recorded one:
    the response log-probs, and how many routed (token, layer) rows the router's own top-k
    (on the same hidden states) would have chosen differently, of how many."""
    out, differ, total = [], 0, 0
    for s in samples:
        routes = s.routed_experts.long()
        hooks, own = [], []
        for i, router in enumerate(engine.routers):
            def force(module, args, output, i=i, routes=routes, own=own):
                logits = output[0]
                ids = routes[:, i]
                own.append((logits.topk(ids.shape[-1], -1).indices, ids))
                scores = torch.softmax(logits.float().gather(-1, ids), -1).to(logits.dtype)
                return logits, scores, ids
            hooks.append(router.register_forward_hook(force))
        with torch.no_grad():
            logits = engine.model(s.tokens[None]).logits[0]
        for h in hooks:
            h.remove()
        for mine, recorded in own:  # the last row is the unrouted last token
            differ += int((mine[:-1].sort(-1).values != recorded[:-1].sort(-1).values)
                          .any(-1).sum())
            total += mine.shape[0] - 1
        logp = torch.log_softmax(logits.float() / TEMPERATURE, -1)[:-1]
        logp = logp.gather(-1, s.tokens[1:, None])[:, 0]
        start = int(torch.nonzero(s.loss_mask)[0]) - 1
        out.append(logp[start:])
    return out, differ, total


def _own_routes(engine: HFEngine, samples: list[TrainSample]) -> list[torch.Tensor]:
    """The transformers model's own top-k for every token of each sample (one un-cached
    forward; the engine's router hooks capture them)."""
    out = []
    with torch.no_grad():
        for s in samples:
            engine._captured = []
            engine.model(s.tokens[None])
            out.append(engine._take_routes(1, len(s.tokens))[0])
    return out


def _own_megatron_routes(models, mbs, recorder) -> list[torch.Tensor]:
    """Megatron's own routes (recorded, not replayed) of every sample, token-aligned."""
    compute_logprobs(models, mbs, ForwardOptions(chunk_size=16), replay=recorder)
    return [r for mb, row in zip(mbs, recorder.take(mbs), strict=True)
            for r in sample_routes(mb, row)]


def _route_set_mismatches(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    """(token, layer) rows whose expert SETS differ."""
    return sum(int((x.long().sort(-1).values != y.long().sort(-1).values).any(-1).sum())
               for x, y in zip(a, b, strict=True))


def _r2(models, mbs, samples, options, recorder, replayer) -> tuple[list, list, float, float]:
    """R2: record Megatron's own routes in a forward pass, then replay them. Returns the
    recorded per-sample routes, the record pass's rows, the replay's disagreement and the
    largest |logp(replay) - logp(record)| over the responses (padding rows route differently)."""
    recorded_logp = compute_logprobs(models, mbs, options, replay=recorder)
    rows = recorder.take(mbs)
    routes = [r for mb, row in zip(mbs, rows, strict=True) for r in sample_routes(mb, row)]
    replayed = [dataclasses.replace(s, routed_experts=r) for s, r in zip(samples, routes,
                                                                         strict=True)]
    tp = ps.get_tensor_model_parallel_world_size()
    again = make_micro_batches(replayed, num_micro_batches=2, seq_multiple=3, row_multiple=tp)
    replay_logp = _response_logprobs(compute_logprobs(models, again, options, replay=replayer),
                                     again, samples)
    diff = max(float((a - b).abs().max()) for a, b in zip(
        replay_logp, _response_logprobs(recorded_logp, mbs, samples), strict=True))
    return routes, recorded_logp, replayer.last_metrics["router/replay_disagreement"], diff


def _router_grads_are_zero(models, tconfig, samples, engine_logp, replayer, tp,
                           options) -> tuple[float, list[Any]]:
    """One replayed training step: 1.0 if some local router weight got no gradient."""
    models = wrap_ddp(models, tconfig)
    attach_schedule_hooks(models)
    optimizer = build_optimizer(models, TrainerConfig(lr=1e-3), params_dtype=torch.float32)
    trained = []
    for k, (s, logp) in enumerate(zip(samples, engine_logp, strict=True)):
        old = torch.zeros(len(s.tokens))
        old[len(s.tokens) - len(logp):] = logp + 0.05
        trained.append(dataclasses.replace(s, old_logprobs=old,
                                           advantages=torch.tensor(1.0 if k % 2 else -1.0)))
    mbs = make_micro_batches(trained, num_micro_batches=2, seq_multiple=3, row_multiple=tp)
    spec = Objective.resolve("grpo", agg="token-mean")
    zero = [0.0]

    def check(ms) -> None:
        for model in ms:
            for name, p in model.named_parameters():
                if name.endswith("router.weight") and not bool(p.main_grad.abs().sum() > 0):
                    zero[0] = 1.0

    result = train_step(models, optimizer, mbs, spec, options, on_grads=check, replay=replayer)
    assert not result.skipped
    return zero[0], models


class _TrackedEngine:
    """The HF engine, recording the calls of a sync and the peak bytes of exported tensor
    storages alive while it loads (a storage is alive until every view handed over is gone).
    Views of the model's own parameters (an unsharded tensor is handed over as a view, not a
    copy) cost no extra memory and are not counted."""

    def __init__(self, engine: HFEngine, models: list[Any]) -> None:
        self.engine, self.calls = engine, []
        self.param_storages = {p.untyped_storage().data_ptr() for chunk in models
                               for p in chunk.parameters()}
        self.views = 0  # tensors handed over as views of parameters
        self.live: dict[int, list[int]] = {}
        self.peak = self.largest = 0

    def wake_up(self, tags=None) -> None:
        self.calls.append("wake:" + ",".join(tags or ["all"]))
        self.engine.wake_up(tags)

    def _release(self, key: int) -> None:
        self.live[key][0] -= 1
        if self.live[key][0] == 0:
            del self.live[key]

    def update_weights(self, weights) -> int:
        self.calls.append("update")

        def watched():
            for name, tensor in weights:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in self.param_storages:
                    self.views += 1
                    yield name, tensor
                    continue
                self.live.setdefault(key, [0, storage.nbytes()])[0] += 1
                weakref.finalize(tensor, self._release, key)
                self.largest = max(self.largest, storage.nbytes())
                self.peak = max(self.peak, sum(size for _, size in self.live.values()))
                yield name, tensor
                del tensor

        return self.engine.update_weights(watched())


def run_case(layout: str, root: Path) -> dict[str, float]:
    source = root / "qwen3_moe"
    checkpoint = HFCheckpoint(source)
    config = checkpoint.config
    arch = Architecture.from_hf(config)
    engine = HFEngine(source, device="cpu")
    batch = engine.generate(PROMPTS, SamplingParams(temperature=TEMPERATURE, max_tokens=7,
                                                    seed=123, ignore_eos=True))
    samples = samples_of(batch)
    engine_logp = [r.logprobs for r in batch.rollouts]

    parallel = ParallelConfig(**LAYOUTS[layout])
    initialize_parallel(parallel, ModelFacts.from_hf(config), seed=7)
    tconfig = transformer_config_from_hf(config, parallel, dtype="float32", routing_replay=True,
                                         use_transformer_engine=False)
    models = build_model(tconfig, config, use_transformer_engine=False)
    load_hf_weights(models, checkpoint)
    replayer = RouteReplayer(models, arch.moe_layers, arch.num_experts, 2)
    tp = ps.get_tensor_model_parallel_world_size()
    mbs = make_micro_batches(samples, num_micro_batches=2, seq_multiple=3, row_multiple=tp)
    options = ForwardOptions(temperature=TEMPERATURE, chunk_size=16)

    rows = compute_logprobs(models, mbs, options, replay=replayer)
    got = _response_logprobs(rows, mbs, samples)
    errs = {"logp": max(float((a - b).abs().max()) for a, b in zip(got, engine_logp,
                                                                   strict=True)),
            "disagreement_unperturbed": replayer.last_metrics["router/replay_disagreement"]}
    # R2 on the unperturbed model: Megatron's own routes are the engine's (last token aside)
    recorder = RouteRecorder(models, arch.moe_layers, arch.num_experts, 2)
    routes, rows, _, _ = _r2(models, mbs, samples, options, recorder, replayer)
    errs["r2_vs_engine"] = float(_route_set_mismatches(
        [r[:-1] for r in routes], [s.routed_experts[:-1] for s in samples]))
    got = _response_logprobs(rows, mbs, samples)
    errs["r2_logp"] = max(float((a - b).abs().max()) for a, b in zip(got, engine_logp,
                                                                     strict=True))

    # perturb every router the same way on every rank, then mirror it into the engine
    g = torch.Generator().manual_seed(99)
    for chunk in models:
        for name, p in chunk.named_parameters():
            if name.endswith("router.weight"):
                with torch.no_grad():
                    p.add_(NOISE * torch.randn(p.shape, generator=g))
    engine.update_weights((n, t) for n, t in export_hf_weights(models, config)
                          if n.endswith("mlp.gate.weight"))
    # R2 on the perturbed model: the recorded routes are its own (transformers' top-k with
    # the same perturbed routers), and replaying them reproduces the recording pass exactly
    routes, _, errs["r2_replay_disagreement"], errs["r2_replay_logp"] = _r2(
        models, mbs, samples, options, recorder, replayer)
    errs["r2_vs_own_perturbed"] = float(_route_set_mismatches(routes,
                                                              _own_routes(engine, samples)))
    rows = compute_logprobs(models, mbs, options, replay=replayer)
    got = _response_logprobs(rows, mbs, samples)
    forced, differ, total = _forced(engine, samples)
    errs["logp_perturbed"] = max(float((a - b).abs().max()) for a, b in zip(got, forced,
                                                                           strict=True))
    errs["router_grad_zero"], models = _router_grads_are_zero(
        models, tconfig, samples, engine_logp, replayer, tp, options)
    # after the optimizer step: sync into the engine in small buckets, then compare every tensor
    bucket = 8 << 10
    tracked = _TrackedEngine(engine, models)
    metrics = sync_weights(export_hf_weights(models, config), tracked, bucket_bytes=bucket)
    errs["sync_peak_bytes"] = float(tracked.peak)
    errs["sync_peak_over_bound"] = float(tracked.peak > bucket + 2 * tracked.largest)
    errs["sync_peak_over_quarter_model"] = float(tracked.peak > metrics["sync/bytes"] / 4)
    # unsharded tensors (all of them on one rank) are handed over without a copy
    errs["sync_copied_unsharded"] = float(tp == 1 and tracked.views == 0)
    errs["sync_wake_order_wrong"] = float(tracked.calls != ["wake:weights", "update",
                                                            "wake:kv_cache"])
    megatron = dict(export_hf_weights(models, config))
    mine = dict(engine.hf_tensors())
    errs["sync_mismatches"] = float(sum(not torch.equal(mine[n], t) for n, t in megatron.items())
                                    + len(set(mine) ^ set(megatron)))
    errs["sync_buckets_below_2"] = float(metrics["sync/buckets"] < 2)
    errs["disagreement"] = replayer.last_metrics["router/replay_disagreement"]
    errs["disagreement_true"] = differ / total
    dp = ps.get_data_parallel_world_size()  # every DP rank replays the whole batch here
    errs["routes_counted_minus_true"] = abs(replayer.last_metrics["router/replayed_routes"]
                                            - total * dp)
    # R3 with the weights the sync put into the engine: fresh rollouts, replayed in Megatron
    synced = engine.generate(PROMPTS, SamplingParams(temperature=TEMPERATURE, max_tokens=7,
                                                     seed=321, ignore_eos=True))
    synced_samples = samples_of(synced)
    synced_mbs = make_micro_batches(synced_samples, num_micro_batches=2, seq_multiple=3,
                                    row_multiple=tp)
    got = _response_logprobs(compute_logprobs(models, synced_mbs, options, replay=replayer),
                             synced_mbs, synced_samples)
    errs["synced_logp"] = max(float((a - r.logprobs).abs().max())
                              for a, r in zip(got, synced.rollouts, strict=True))
    errs["synced_own_vs_engine"] = float(_route_set_mismatches(
        [r[:-1] for r in _own_megatron_routes(models, synced_mbs, recorder)],
        [s.routed_experts[:-1] for s in synced_samples]))
    destroy_parallel()
    dist.barrier()
    return errs


def passes(errs: dict[str, Any]) -> bool:
    return (errs["logp"] <= TOL and errs["logp_perturbed"] <= TOL
            and errs["disagreement_unperturbed"] == 0.0 and errs["disagreement_true"] > 0.02
            and abs(errs["disagreement"] - errs["disagreement_true"]) < 1e-12
            and errs["routes_counted_minus_true"] == 0.0 and errs["router_grad_zero"] == 0.0
            and errs["sync_mismatches"] == 0.0 and errs["sync_buckets_below_2"] == 0.0
            and errs["sync_peak_over_bound"] == 0.0
            and errs["sync_peak_over_quarter_model"] == 0.0
            and errs["sync_copied_unsharded"] == 0.0
            and errs["sync_wake_order_wrong"] == 0.0
            and errs["r2_vs_engine"] == 0.0 and errs["r2_logp"] <= TOL
            and errs["r2_vs_own_perturbed"] == 0.0 and errs["r2_replay_disagreement"] == 0.0
            and errs["r2_replay_logp"] <= 1e-6
            and errs["synced_logp"] <= TOL and errs["synced_own_vs_engine"] == 0.0)
