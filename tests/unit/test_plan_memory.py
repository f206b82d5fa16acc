"""`megarl.memory_model` (parameter counts, per-GPU memory) and the ranks of a layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.config import ParallelConfig, load_config
from megarl.errors import ConfigError
from megarl.memory_model import (
    GIB,
    count_params,
    estimate_memory,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "configs" / "up_gspo_30b.yaml"
QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"


def _hf_params(hf: dict, device: str = "cpu") -> tuple[int, int]:
    """(sum of numel, numel of ONE routed expert) of transformers' model of ``hf``."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied tables counted once
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    moe_layers = len({n.split(".mlp.experts.")[0] for n, _ in model.named_parameters()
                      if ".mlp.experts." in n})
    num_experts = int(hf.get("num_experts") or 0)
    return total, experts // (moe_layers * num_experts) if num_experts else 0


def test_qwen3_30b_a3b_counts_match_the_model_card() -> None:
    """HF model card: 30.5B total, 29.9B non-embedding, 3.3B activated. Our active count
    (3.353B) includes both embedding tables, the model-card convention (Mixtral's 12.9B active
    does too); 3.353B is 1.6 % above 3.3, so the card truncates: assert [3.3, 3.4) and 2 %.
    Excluding the input embedding (3.04B) would be 8 % off."""
    n = count_params(load_config(RECIPE).model.known_config())
    assert n.total == pytest.approx(30.5e9, rel=0.01)
    assert n.non_embedding == pytest.approx(29.9e9, rel=0.01)
    assert 3.3e9 <= n.active < 3.4e9
    assert n.active == pytest.approx(3.3e9, rel=0.02)
    assert n.active_compute == n.active - 151936 * 2048


def test_qwen3_30b_a3b_total_equals_transformers_numel_on_meta() -> None:
    hf = dict(load_config(RECIPE).model.known_config())
    total, one_expert = _hf_params(hf, device="meta")
    n = count_params(hf)
    assert n.total == total == 30_532_122_624
    assert n.active == total - 48 * (128 - 8) * one_expert


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3", "qwen2", "llama", "llama_tied_bias"])
def test_tiny_counts_equal_transformers_numel(variant: str) -> None:
    """The quickstart's tiny Qwen3-MoE (and dense Qwen3 / Llama variants of it) built on CPU."""
    hf = dict(load_config(QUICKSTART).model.known_config())
    if variant != "qwen3_moe":
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "norm_topk_prob"):
            hf.pop(key)
        hf.update(model_type=variant.split("_")[0],
                  architectures=[{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
                                 .get(variant, "LlamaForCausalLM")])
    if variant == "llama_tied_bias":
        hf.update(tie_word_embeddings=True, attention_bias=True)
    if variant == "qwen3_moe":
        hf.update(mlp_only_layers=[1])  # one dense layer among the MoE ones
    total, one_expert = _hf_params(hf)
    n = count_params(hf)
    assert n.total == total
    if variant == "qwen3_moe":
        moe_layers = 1
        assert n.active == total - moe_layers * (4 - 2) * one_expert
    else:
        assert n.active == n.total and n.top_k == 0


def test_rank_groups_equal_megatron_rank_generator() -> None:
    from megatron.core.parallel_state import RankGenerator

    for tp, cp, pp, ep, etp, world in [(2, 2, 2, 4, 1, 16), (2, 1, 2, 4, 2, 32),
                                       (1, 1, 4, 8, 1, 32), (2, 1, 1, 8, 1, 32)]:
        dp = world // (tp * cp * pp)
        layout = ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp).resolve(world)
        assert layout.dp == dp
        dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        expert = RankGenerator(tp=etp, ep=ep, dp=layout.edp, pp=pp, cp=1,
                               order="tp-cp-ep-dp-pp")
        for axis in ("tp", "cp", "dp", "pp"):
            assert layout.groups(axis) == sorted(dense.get_ranks(axis)), (axis, layout)
        for axis, token in (("ep", "ep"), ("etp", "tp"), ("edp", "dp")):
            assert layout.groups(axis) == sorted(expert.get_ranks(token)), (axis, layout)
        for rank in range(world):  # one rank's coordinates: its index in each of its groups
            at = layout.coordinates(rank)
            for axis in ("tp", "cp", "dp", "pp", "ep", "etp"):
                index = layout.group_of(axis, rank).index(rank)
                assert getattr(at, f"{axis}_rank") == index, (axis, rank, layout)


def test_stages_and_experts_of_a_small_layout() -> None:
    layout = ParallelConfig(tp=2, pp=2, cp=1, ep=4, etp=1).resolve(16)
    assert layout.stage_layers(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # VPP: megatron's offset vp_stage * layers/vpp + pp_rank * layers/(pp*vpp)
    vpp = ParallelConfig(tp=2, pp=2, cp=1, ep=4, etp=1, vpp=2).resolve(16)
    assert vpp.stage_layers(8) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.expert_ranges(16) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert layout.edp == 2
    assert layout.group_of("tp", 0) == [0, 1]
    assert layout.group_of("ep", 0) == [0, 1, 2, 3]
    assert layout.group_of("edp", 0) == [0, 4]
    assert layout.group_of("pp", 0) == [0, 8]
    at = layout.coordinates(13)  # 13 = tp 1 + 2 * dp 2 + 8 * pp 1 = ep 1 + 4 * edp 1 + 8 * pp 1
    assert (at.tp_rank, at.dp_rank, at.pp_rank, at.ep_rank, at.etp_rank) == (1, 2, 1, 1, 0)
    assert at.is_last_stage and at.dp == 4 and at.sequence_parallel


def test_memory_lines_on_one_gpu_are_the_whole_model() -> None:
    c = load_config(RECIPE, ["parallel.world_size=1", "parallel.tp=1", "parallel.ep=1",
                             "parallel.etp=1", "rollout.tp=1"])
    m = estimate_memory(c)
    n = count_params(c.model.known_config())
    assert m.local_params == n.total
    assert m.line("weights").gib == pytest.approx(2 * n.total / GIB)  # bf16
    assert m.line("gradients").gib == pytest.approx(4 * n.total / GIB)  # fp32 grad buffer
    assert m.line("optimizer").gib == pytest.approx(12 * n.total / GIB)  # master + m + v
    assert not m.fits


def test_verdict_flips_when_the_30b_is_not_sharded() -> None:
    fits = estimate_memory(load_config(RECIPE))
    assert fits.fits and fits.verdict().startswith("fits on 79.1 GiB")
    c = load_config(RECIPE, ["parallel.ep=1", "parallel.tp=1", "parallel.etp=1"])
    m = estimate_memory(c)
    assert not m.fits
    verdict = m.verdict()
    assert verdict.startswith("does not fit on 79.1 GiB")
    assert "training needs" in verdict and "GiB over" in verdict and "parallel.ep" in verdict


def test_layout_is_none_without_a_world_size() -> None:
    assert load_config(RECIPE, ["parallel.world_size=null"]).parallel.resolved() is None


def test_gpu_memory_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="parallel.gpu_memory_gib"):
        ParallelConfig(gpu_memory_gib=0).check()


def test_logprob_chunk_matches_the_train_step() -> None:
    from megarl.megatron.step import ForwardOptions
    from megarl.memory_model import LOGPROB_CHUNK_TOKENS

    assert ForwardOptions().chunk_size == LOGPROB_CHUNK_TOKENS


def test_megarl_plan_says_the_30b_recipe_fits() -> None:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    # the checkpoint and data are on the cluster, not here
    r = subprocess.run([sys.executable, "-m", "megarl", "plan", str(RECIPE), "--skip-path-checks"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "30.532 B" in out and "3.353 B" in out
    assert "rank 0's EP group" in out and "[0, 1, 2, 3, 4, 5, 6, 7]" in out
    assert "experts 112-127 on ranks [7, 15, 23, 31]" in out
    assert "decoder layers 0-47 on ranks 0-31" in out
    for label in ("weights", "gradients", "optimizer", "activations", "log-prob chunk",
                  "vLLM KV cache", "weight-sync bucket"):
        assert label in out
    assert "fits on 79.1 GiB GPUs (parallel.gpu_memory_gib): yes" in out
