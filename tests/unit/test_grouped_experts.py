"""Grouped-GEMM experts (megarl/megatron/experts.py) against megatron's SequentialMLP, on CPU.

Kernel level (in this process): ``torch._grouped_mm`` (the CUDA path's code, on CPU's kernel)
and the per-expert loop against a plain per-expert reference, values and gradients, with empty
experts and no tokens at all. Module and model level (one spawned process with megatron's CPU
shim, shared by the tests below): GroupedGemmExperts vs SequentialMLP built from the same seed
(same weights; outputs and every gradient, fp32 exact and bf16 close, random routing with
empty experts, probs on input), a whole tiny Qwen3-MoE built both ways (identical logits and
gradients), the same distributed-checkpoint tensors, and checkpoints written by one loading into
the other. The GPU side of these checks is the check phase of benchmarks/experts.py.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from megarl.megatron.experts import (
    expert_offsets,
    grouped_linear,
    grouped_mm_unsupported,
    looped_linear,
    per_expert,
)

COUNTS = [5, 0, 3, 0, 0, 9, 1, 0]  # experts with no tokens, first and last included


def _reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    rows = torch.split(x, counts)
    return torch.cat([r @ w[e].t() for e, r in enumerate(rows)])


def _fwd_bwd(fn, x, w, seed=0):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("counts", [COUNTS, [18, 0, 0], [0, 0, 18], [0, 0, 0]])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_grouped_and_looped_linear_equal_the_per_expert_reference(counts, impl) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 32, generator=g)
    w = torch.randn(len(counts), 24, 32, generator=g)
    if impl == "grouped_mm":
        def ours(a, b):
            return grouped_linear(a, b, expert_offsets(torch.tensor(counts), a.device))
    else:
        def ours(a, b):
            return looped_linear(a, b, counts)
    got = _fwd_bwd(ours, x, w)
    want = _fwd_bwd(lambda a, b: _reference(a, b, counts), x, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.count_nonzero(got[2][empty]) == 0  # no tokens, no weight gradient


def test_grouped_mm_constraints_are_reported() -> None:
    w = torch.zeros(2, 8, 16)
    assert grouped_mm_unsupported(torch.zeros(5, 16), [w]) is None  # any number of rows
    assert "multiples of 4" in grouped_mm_unsupported(torch.zeros(4, 16), [torch.zeros(2, 6, 16)])
    assert "float64" in grouped_mm_unsupported(torch.zeros(4, 16, dtype=torch.float64), [w])
    assert "mixed dtypes" in grouped_mm_unsupported(torch.zeros(4, 16), [w.bfloat16()])
    assert "aligned" in grouped_mm_unsupported(torch.zeros(65)[1:].view(4, 16), [w])
    # bfloat16 needs multiples of 8 elements (16 bytes)
    bf = torch.zeros(2, 8, 16, dtype=torch.bfloat16)
    assert grouped_mm_unsupported(torch.zeros(4, 16, dtype=torch.bfloat16), [bf]) is None
    assert grouped_mm_unsupported(torch.zeros(4, 12, dtype=torch.bfloat16),
                                  [torch.zeros(2, 8, 12, dtype=torch.bfloat16)]) is not None


def test_per_expert_names_are_sequential_mlps() -> None:
    w = torch.arange(24.0).view(3, 2, 4)
    name = "decoder.layers.1.mlp.experts.linear_fc1.weight"
    out = list(per_expert(name, w))
    assert [n for n, _ in out] == [
        f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight" for j in range(3)]
    assert all(t.data_ptr() == w[j].data_ptr() for j, (_, t) in enumerate(out))  # views
    for other in ("decoder.layers.1.mlp.experts.linear_fc1.weight0",  # TE's grouped names
                  "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
                  "decoder.layers.1.mlp.router.weight"):
        assert list(per_expert(other, w)) == [(other, w)]


# ---------------------------------------------------------------------------------------------
# megatron modules (one spawned process: the CPU shim patches process-global state)

TINY: dict[str, Any] = {
    "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False,
    "initializer_range": 0.1, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _module_parity(dtype: torch.dtype, impl: str, **overrides: Any) -> dict[str, float]:
    """GroupedGemmExperts vs SequentialMLP from the same seed: worst relative errors."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

    from megarl.config import ParallelConfig
    from megarl.megatron.experts import GroupedGemmExperts
    from megarl.megatron.model import transformer_config_from_hf

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    config = transformer_config_from_hf({**TINY, **overrides.pop("hf", {})}, ParallelConfig(),
                                        dtype=name, use_transformer_engine=False, **overrides)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    experts, counts = config.num_moe_experts, COUNTS
    assert experts == len(COUNTS)
    torch.manual_seed(3)
    seq = SequentialMLP(experts, config, MLPSubmodules(ColumnParallelLinear, RowParallelLinear),
                        pg_collection=pgs)
    torch.manual_seed(3)
    grp = GroupedGemmExperts(experts, config, pg_collection=pgs, impl=impl)
    init = max(_rel(grp.linear_fc1.weight[j], seq.local_experts[j].linear_fc1.weight) +
               _rel(grp.linear_fc2.weight[j], seq.local_experts[j].linear_fc2.weight)
               for j in range(experts))  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(sum(counts), config.hidden_size, generator=g).to(dtype)
    p0 = torch.rand(sum(counts), generator=g)  # the router's probs are fp32
    dy = torch.randn(sum(counts), config.hidden_size, generator=g).to(dtype)
    results = []
    for module in (seq, grp):
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        y, bias = module(x, torch.tensor(counts), p)
        assert bias is None
        y.backward(dy)
        results.append((y, x.grad, p.grad))
    errs = {"init": init}
    for key, a, b in zip(("out", "dx", "dprobs"), results[1], results[0], strict=True):
        errs[key] = _rel(a, b)
    errs["dw"] = max(
        _rel(grp.linear_fc1.weight.grad[j], seq.local_experts[j].linear_fc1.weight.grad)
        + _rel(grp.linear_fc2.weight.grad[j], seq.local_experts[j].linear_fc2.weight.grad)
        for j in range(experts) if counts[j])  # fmt: skip
    errs["dw_empty"] = max(float(grp.linear_fc1.weight.grad[j].abs().max() +
                                 grp.linear_fc2.weight.grad[j].abs().max())
                           for j in range(experts) if not counts[j])  # fmt: skip
    # no tokens at all on this rank: zero output rows, zero weight gradients, no error
    y, _ = grp(x0[:0].clone().requires_grad_(True), torch.zeros(experts, dtype=torch.long),
               p0[:0])
    y.sum().backward()
    errs["no_tokens"] = float(y.numel())
    errs["fell_back_to_loop"] = float(grp._warned_fallback)
    return errs


def _model(grouped: bool):
    from megarl.config import ModelFacts, ParallelConfig
    from megarl.megatron.model import build_model, transformer_config_from_hf
    from megarl.megatron.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(), ModelFacts.from_hf(TINY), seed=1234)
    config = transformer_config_from_hf(TINY, ParallelConfig(), dtype="float32",
                                        use_transformer_engine=False)
    (model,) = build_model(config, TINY, use_transformer_engine=False, grouped_experts=grouped)
    return model


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1).view(1, 1, 12, 12)
    return model(ids, pos, mask)


def _flat_expert_shards(model, metadata=None) -> dict[str, list]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict(metadata=metadata)
    apply_factories(sd)
    out: dict[str, list] = {}
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor) and ".experts." in v.key:
            out.setdefault(v.key, []).append(
                (tuple(v.global_offset), tuple(v.global_shape), tuple(v.local_shape),
                 v.replica_id, v.prepend_axis_num, v.data.clone()))  # fmt: skip
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


def _model_checks(tmp: str) -> dict[str, float]:
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from megarl.convert.mapping import Architecture
    from megarl.megatron.dist_checkpoint import checkpoint_state, load_distributed, save_distributed
    from megarl.megatron.experts import GroupedGemmExperts, named_expert_tensors
    from megarl.megatron.weights import export_hf_weights

    seq, grp = _model(False), _model(True)
    assert isinstance(grp.decoder.layers[0].mlp.experts, GroupedGemmExperts)
    assert not any(isinstance(m, GroupedGemmExperts) for m in seq.modules())
    errs: dict[str, float] = {}
    ps, pg = dict(seq.named_parameters()), dict(named_expert_tensors(grp))
    errs["names"] = float(len(set(ps) ^ set(pg)))
    errs["init"] = max(float((ps[k] - pg[k]).abs().max()) for k in ps)
    ls, lg = _logits(seq), _logits(grp)
    errs["logits"] = float((ls - lg).abs().max())
    ls.square().mean().backward()
    lg.square().mean().backward()
    gs = {k: p.grad for k, p in seq.named_parameters()}
    gg = dict(named_expert_tensors(grp, lambda p: p.grad))
    errs["grads"] = max(_rel(gg[k], gs[k]) for k in gs)
    # distributed checkpoints: the same tensors under the same keys, both sharding modes
    for tag, meta in (("", None), ("_singleton", {"singleton_local_shards": True})):
        fs, fg = _flat_expert_shards(seq, meta), _flat_expert_shards(grp, meta)
        bad = set(fs) ^ set(fg)
        for k in set(fs) & set(fg):
            bad |= {k for a, b in zip(fs[k], fg[k], strict=True)
                    if a[:5] != b[:5] or not torch.equal(a[5], b[5])}  # fmt: skip
        errs[f"shard_mismatches{tag}"] = float(len(bad) + (not fs))
    # a checkpoint of one loads into the other (and HF export agrees)
    config = {**TINY, "architectures": ["Qwen3MoeForCausalLM"]}
    with torch.no_grad():
        for p in grp.parameters():
            p.add_(0.01)  # grp now differs from seq (and from a fresh model)
    save_distributed(Path(tmp) / "grouped", [grp], config)
    save_distributed(Path(tmp) / "sequential", [seq], config)
    seq2, grp2 = _model(False), _model(True)
    load_distributed(Path(tmp) / "grouped", [seq2], config)
    load_distributed(Path(tmp) / "sequential", [grp2], config)
    with torch.no_grad():
        errs["grouped_ckpt_into_sequential"] = float((_logits(seq2) - _logits(grp)).abs().max())
        errs["sequential_ckpt_into_grouped"] = float((_logits(grp2) - _logits(seq)).abs().max())
    hf_g, hf_s = dict(export_hf_weights([grp], config)), dict(export_hf_weights([seq2], config))
    errs["export_mismatches"] = float(sum(not torch.equal(hf_g[k], hf_s[k]) for k in hf_g)
                                      + len(set(hf_g) ^ set(hf_s)))  # fmt: skip
    # canonical keys: TE's MoE norm key, no _extra_state; hf/config.json beside the tensors
    keys = set(dist_checkpointing.load_tensors_metadata(str(Path(tmp) / "grouped")))
    errs["local_norm_keys"] = float(sum(k.endswith("mlp.linear_fc1.layer_norm_weight")
                                        for k in keys))
    errs["te_norm_keys"] = float(sum(k.endswith("pre_mlp_layernorm.weight") for k in keys))
    errs["extra_state_keys"] = float(sum("_extra_state" in k for k in keys))
    errs["hf_config"] = float((Path(tmp) / "grouped" / "hf" / "config.json").is_file())
    # a checkpoint written before the keys were canonical (the local spec's norm key) loads
    legacy = Path(tmp) / "legacy"
    legacy.mkdir()
    dist_checkpointing.save(checkpoint_state([grp], Architecture.from_hf(config),
                                             te_norm_key=False), str(legacy))
    errs["legacy_has_local_keys"] = float(any(
        k.endswith("mlp.linear_fc1.layer_norm_weight")
        for k in dist_checkpointing.load_tensors_metadata(str(legacy))))
    seq3 = _model(False)
    load_distributed(legacy, [seq3], config)
    with torch.no_grad():
        errs["legacy_ckpt"] = float((_logits(seq3) - _logits(grp)).abs().max())
    return errs


def _worker(rank: int, port: int, tmp: str, results) -> None:
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", OMP_NUM_THREADS="1")
    from megarl.megatron import cpu

    cpu.install()
    from megarl.config import ModelFacts, ParallelConfig
    from megarl.megatron.parallel import init_process_group, initialize_parallel

    init_process_group("gloo", timeout_s=120)
    initialize_parallel(ParallelConfig(), ModelFacts.from_hf(TINY), seed=1234)
    out = {}
    for impl in ("grouped_mm", "loop"):
        for dtype in (torch.float32, torch.bfloat16):
            out[f"{impl}-{dtype}"] = _module_parity(dtype, impl)
    out["probs_on_input"] = _module_parity(
        torch.float32, "grouped_mm", hf={"num_experts_per_tok": 1, "norm_topk_prob": False},
        moe_apply_probs_on_input=True)  # fmt: skip
    # impl="auto" where torch._grouped_mm cannot run (ffn 18: rows of 72 bytes): the loop
    out["auto-unaligned"] = _module_parity(torch.float32, "auto", hf={"moe_intermediate_size": 18})
    out["auto-aligned"] = _module_parity(torch.float32, "auto")
    # megatron's fused (torch.compile'd) SwiGLU, as MLP uses it with bias_activation_fusion
    out["fused-act"] = _module_parity(torch.float32, "grouped_mm", bias_activation_fusion=True)
    out["model"] = _model_checks(tmp)
    results.update(out)


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(port, str(tmp_path_factory.mktemp("ckpt")), results), nprocs=1,
             join=True)
    return dict(results)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_experts_equal_sequential_mlp_fp32(megatron_results, impl) -> None:
    errs = megatron_results[f"{impl}-{torch.float32}"]
    assert errs["init"] == 0.0, errs  # same seed, same weights
    assert max(errs[k] for k in ("out", "dx", "dprobs", "dw")) <= 1e-6, errs
    assert errs["dw_empty"] == 0.0 and errs["no_tokens"] == 0.0, errs


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_experts_close_to_sequential_mlp_bf16(megatron_results, impl) -> None:
    errs = megatron_results[f"{impl}-{torch.bfloat16}"]
    assert errs["init"] == 0.0, errs
    assert max(errs[k] for k in ("out", "dx", "dprobs", "dw")) <= 2e-2, errs  # bf16 rounding
    assert errs["dw_empty"] == 0.0, errs


def test_auto_uses_grouped_mm_where_it_runs_and_the_loop_elsewhere(megatron_results) -> None:
    aligned, unaligned = megatron_results["auto-aligned"], megatron_results["auto-unaligned"]
    assert aligned["fell_back_to_loop"] == 0.0 and unaligned["fell_back_to_loop"] == 1.0
    for errs in (aligned, unaligned):
        assert max(errs[k] for k in ("out", "dx", "dprobs", "dw")) <= 1e-6, errs


def test_grouped_experts_default_and_te_conflict() -> None:
    from megarl.errors import ConfigError
    from megarl.megatron.model import use_grouped_experts

    assert use_grouped_experts(None, use_te=False) and not use_grouped_experts(None, use_te=True)
    assert not use_grouped_experts(False, use_te=False)
    with pytest.raises(ConfigError, match="grouped_experts"):
        use_grouped_experts(True, use_te=True)


def test_fused_activation(megatron_results) -> None:
    errs = megatron_results["fused-act"]
    assert max(errs[k] for k in ("out", "dx", "dprobs", "dw")) <= 1e-6, errs


def test_probs_on_input(megatron_results) -> None:
    errs = megatron_results["probs_on_input"]
    assert max(errs[k] for k in ("out", "dx", "dprobs", "dw")) <= 1e-6, errs


def test_tiny_moe_model_grouped_equals_sequential(megatron_results) -> None:
    errs = megatron_results["model"]
    assert errs["names"] == 0.0 and errs["init"] == 0.0, errs
    assert errs["logits"] <= 1e-6 and errs["grads"] <= 1e-5, errs


def test_checkpoints_are_interchangeable(megatron_results) -> None:
    errs = megatron_results["model"]
    assert errs["shard_mismatches"] == 0.0 and errs["shard_mismatches_singleton"] == 0.0, errs
    assert errs["grouped_ckpt_into_sequential"] <= 1e-6, errs
    assert errs["sequential_ckpt_into_grouped"] <= 1e-6, errs
    assert errs["export_mismatches"] == 0.0, errs


def test_checkpoint_keys_are_canonical_and_old_keys_still_load(megatron_results) -> None:
    errs = megatron_results["model"]
    assert errs["local_norm_keys"] == 0.0 and errs["te_norm_keys"] == 2.0, errs
    assert errs["extra_state_keys"] == 0.0 and errs["hf_config"] == 1.0, errs
    assert errs["legacy_has_local_keys"] == 1.0 and errs["legacy_ckpt"] <= 1e-6, errs
