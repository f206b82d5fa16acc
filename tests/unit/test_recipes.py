"""The paper recipes in examples/configs: they load and say what the papers' appendices say."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    assert Config.from_dict(config.to_dict()) == config


def _recipe(name: str) -> Config:
    return load_config(ROOT / "examples" / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("name,loss", [("up_gspo_30b", "up_gspo"), ("gspo_30b", "gspo")])
def test_30b_recipes_match_up_paper_tables_a1_a2(name: str, loss: str) -> None:
    """Seed 000, Tables A1 / A2, sequence-level (MoE 30B) column."""
    c = _recipe(name)
    assert c.model.name_or_path == "Qwen/Qwen3-30B-A3B-Base"
    assert c.algo.loss == loss
    # Table A1
    assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (2048, 20480)
    assert c.trainer.prompts_per_step == 256  # global batch size (prompts)
    assert c.rollout.n_samples == 16  # rollout n
    # PPO mini-batch 32 counts prompts (verl); megarl counts sequences
    assert c.trainer.mini_batch_size == 32 * c.rollout.n_samples
    assert c.updates_per_step == 8
    assert c.trainer.lr == 1e-6
    params = c.algo.resolved_params()
    assert (params["eps_low"], params["eps_high"]) == (3e-4, 4e-4)
    assert params["dual_clip_c"] is None
    assert c.algo.kl_beta == 0.0
    # Table A2
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    assert c.eval.top_p == 0.7  # validation top-p
    assert c.eval.max_response_len in (None, 20480)  # None = the rollout's 20,480
    # AIME24 avg@32 / maj@32 / best@32 (pass@32)
    assert c.eval.k == 32 and 32 in c.eval.reported_ks()
    assert [Path(e).name for e in c.data.eval] == ["aime"]
    assert c.data.train == "BytedTsinghua-SIA/DAPO-Math-17k"


def test_up_gspo_and_gspo_differ_only_in_the_objective() -> None:
    """The paper: "The only variable altered between a baseline and its UP counterpart is the
    specific mathematical optimization objective"."""
    up, base = _recipe("up_gspo_30b").to_dict(), _recipe("gspo_30b").to_dict()
    for d in (up, base):
        d["algo"].pop("loss")
        d["logging"].pop("run_name")
    assert up == base


def test_30b_hf_config_is_qwen3_30b_a3b() -> None:
    """The inline config.json lets plan and validation work offline; it must be the real one."""
    f = _recipe("up_gspo_30b").model.facts()
    assert f.complete
    assert (f.num_layers, f.hidden_size, f.num_attention_heads, f.num_query_groups) == (
        48, 2048, 32, 4)
    assert (f.num_experts, f.moe_router_topk, f.vocab_size) == (128, 8, 151936)
    assert f.max_position_embeddings == 32768
