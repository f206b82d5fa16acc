"""The paper recipes in examples/configs: they load, say what the papers' appendices say, and
fit the GPUs they name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megarl.config import Config, load_config
from megarl.data.formats import find_format
from megarl.losses import POLICY_LOSSES
from megarl.memory_model import count_params, estimate_memory
from megarl.plan_report import plan_sections

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
CPU_CONFIGS = ("quickstart", "digitsum", "smollm2_arith")
# (UP recipe, its baseline): the UP paper's three comparisons
UP_PAIRS = [("up_gspo_30b", "gspo_30b"), ("up_dapo_14b", "dapo_14b"), ("up_grpo_8b", "grpo_8b")]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    assert Config.from_dict(config.to_dict()) == config


def _recipe(name: str) -> Config:
    return load_config(ROOT / "examples" / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("name,loss", [("up_gspo_30b", "up_gspo"), ("gspo_30b", "gspo")])
def test_30b_recipes_match_up_paper_tables_a1_a2(name: str, loss: str) -> None:
    """UP (Fan et al.), Tables A1 / A2, sequence-level (MoE 30B) column."""
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
    params = c.algo.objective().params
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


@pytest.mark.parametrize("up_name,base_name", UP_PAIRS)
def test_up_recipes_and_their_baselines_differ_only_in_the_objective(up_name: str,
                                                                     base_name: str) -> None:
    """The paper: "The only variable altered between a baseline and its UP counterpart is the
    specific mathematical optimization objective". UP has no eps_high (Tables A1 / A3: "–"): the
    UP recipes keep the baseline's value, which bounds only the HP/HN metric regions."""
    up, base = _recipe(up_name), _recipe(base_name)
    assert up.algo.loss == f"up_{base.algo.loss}"
    assert (up.logging.run_name, base.logging.run_name) == (up_name, base_name)
    assert "metric" in POLICY_LOSSES[up.algo.loss].params["eps_high"].doc
    assert up.algo.objective().agg == base.algo.objective().agg
    up_d, base_d = up.to_dict(), base.to_dict()
    for d in (up_d, base_d):
        d["algo"].pop("loss")
        d["logging"].pop("run_name")
    assert up_d == base_d


def test_30b_hf_config_is_qwen3_30b_a3b() -> None:
    """The inline config.json lets plan and validation work offline; it must be the real one."""
    f = _recipe("up_gspo_30b").model.facts()
    assert f.complete
    assert (f.num_layers, f.hidden_size, f.num_attention_heads, f.num_query_groups) == (
        48, 2048, 32, 4)
    assert (f.num_experts, f.moe_router_topk, f.vocab_size) == (128, 8, 151936)
    assert f.max_position_embeddings == 32768


@pytest.mark.parametrize("name,loss", [("up_dapo_14b", "up_dapo"), ("dapo_14b", "dapo")])
def test_14b_recipes_match_up_paper_tables_a1_a2(name: str, loss: str) -> None:
    """UP (Fan et al.), Tables A1 / A2, token-level (dense 14B) column, with the DAPO paper's own
    ingredients that the UP paper's DAPO baseline implies."""
    c = _recipe(name)
    assert c.model.name_or_path == "Qwen/Qwen3-14B-Base"
    assert c.algo.loss == loss
    # Table A1
    assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (2048, 20480)
    assert c.trainer.prompts_per_step == 512  # global batch size (prompts)
    assert c.rollout.n_samples == 16  # rollout n
    assert c.trainer.mini_batch_size == 32 * c.rollout.n_samples  # 32 prompts (verl's unit)
    assert c.updates_per_step == 16
    assert c.trainer.lr == 1e-6
    params = c.algo.objective().params
    assert (params["eps_low"], params["eps_high"]) == (0.2, 0.28)
    assert params["dual_clip_c"] is None
    assert c.algo.kl_beta == 0.0
    # Table A2
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    assert c.eval.top_p == 0.7  # validation top-p
    assert c.eval.max_response_len in (None, 20480)  # max generation tokens
    # protocol (i): DAPO-17K, AIME24 avg@32 / maj@32 / best@32
    assert c.data.train == "BytedTsinghua-SIA/DAPO-Math-17k"
    assert [Path(e).name for e in c.data.eval] == ["aime"]
    assert c.eval.k == 32 and 32 in c.eval.reported_ks()
    # DAPO (Yu et al. 2025): token-level loss, dynamic sampling, overlong reward shaping with a
    # 4,096-token cache before 20,480 and penalty 1 on rewards of +-1 = 0.5 on megarl's 0 / 1
    assert c.algo.objective().agg == "token-mean"
    assert c.algo.dynamic_sampling and c.algo.max_sampling_rounds == 30  # 10 batches of 3 x 512
    assert c.algo.overlong_buffer == 4096
    assert c.algo.overlong_penalty == 1.0 * (1 - 0) / (1 - (-1))


@pytest.mark.parametrize("name,loss", [("up_grpo_8b", "up_grpo"), ("grpo_8b", "grpo")])
def test_8b_recipes_match_up_paper_tables_a3_a4(name: str, loss: str) -> None:
    """UP (Fan et al.), Tables A3 / A4: Qwen3-8B on MATH levels 3-5, Pass@1 on five benchmarks."""
    c = _recipe(name)
    assert c.model.name_or_path == "Qwen/Qwen3-8B"
    assert c.algo.loss == loss
    # Table A3
    assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (1024, 3072)
    assert c.trainer.prompts_per_step == 128
    assert c.rollout.n_samples == 8
    assert c.trainer.mini_batch_size == 32 * c.rollout.n_samples
    assert c.updates_per_step == 4
    assert c.trainer.lr == 1e-6
    params = c.algo.objective().params
    assert (params["eps_low"], params["eps_high"]) == (0.2, 0.2)
    assert params["dual_clip_c"] is None
    assert c.algo.advantage == "grpo"
    assert c.algo.objective().agg == "seq-mean-token-mean"  # Eq. 15: 1/G sum_i 1/|o_i| sum_t
    # Table A4
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    assert c.eval.top_p == 0.7
    assert c.eval.max_response_len in (None, 3072)
    # protocol (ii): MATH levels 3-5; Pass@1 (= avg@k) on AIME24, AMC23, MATH500, Minerva,
    # OlympiadBench; Table 1's AIME24 scores are multiples of 1 / (30 problems x 32 samples)
    assert find_format(c.data.train).name == "competition_math"
    assert c.data.train_filter == {"level": ["Level 3", "Level 4", "Level 5"]}
    assert [Path(e).name for e in c.data.eval] == ["aime", "amc", "math", "minerva",
                                                    "olympiad_bench"]
    assert 1 in c.eval.reported_ks()
    for score in (35.73, 33.33, 38.02, 40.10, 37.50, 40.52, 39.90, 20.52, 31.67, 35.52, 41.04):
        correct = score / 100 * 30 * c.eval.k  # of 30 x k samples; scores are rounded to 0.01 %
        assert abs(correct - round(correct)) < 0.005 * 30 * c.eval.k / 100 + 1e-9, score


def test_dgpo_recipe_matches_dgpo_paper() -> None:
    """DGPO (Fu et al., arXiv:2603.14389), §5.1, App. B and Table 12, the 7B row."""
    c = _recipe("dgpo_7b")
    assert c.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert c.algo.loss == "dgpo"
    params = c.algo.objective().params
    assert (params["eps_low"], params["eps_high"]) == (0.2, 0.2)
    assert (params["n"], params["m"]) == (1, 2)
    assert c.algo.objective().agg == "token-mean"  # Eq. 1: 1 / sum_i |o_i|
    assert c.algo.advantage == "grpo"
    assert (c.algo.kl_beta, c.algo.entropy_coef) == (0.0, 0.0)
    # "Rollout Batch Size = 512, Mini-batch Size = 32": 16 off-policy updates per step
    assert c.trainer.prompts_per_step == 512
    assert c.trainer.mini_batch_size == 32 * c.rollout.n_samples
    assert c.updates_per_step == 16
    assert c.rollout.max_response_len == 8192
    assert (c.rollout.temperature, c.rollout.top_p) == (1.0, 1.0)
    # lr 4.63e-7 = 1e-6 x sqrt(1.5 / 7) (App. A.4, nominal sizes), constant, no warm-up;
    # AdamW (0.9, 0.95)
    assert c.trainer.lr == 4.63e-7 == round(1e-6 * math.sqrt(1.5 / 7), 9)
    assert (c.trainer.lr_schedule, c.trainer.lr_warmup_steps) == ("constant", 0)
    assert (c.trainer.adam_beta1, c.trainer.adam_beta2) == (0.9, 0.95)
    assert 0 < c.trainer.weight_decay <= 0.01  # "a small weight decay"
    assert (c.trainer.grad_clip, c.trainer.seed, c.model.dtype) == (1.0, 42, "bfloat16")
    assert c.data.train == "BytedTsinghua-SIA/DAPO-Math-17k"
    assert [Path(e).name for e in c.data.eval] == ["aime", "amc", "math", "minerva",
                                                    "olympiad_bench"]
    assert c.eval.k == 32  # Avg@32, Pass@32


def test_abc_grpo_recipe_matches_paper_and_authors_recipe() -> None:
    """ABC-GRPO (Liu and Chen, arXiv:2601.03895) §5.1 and the authors'
    recipes/Qwen3-4B-Base/abc-grpo/config.yaml (TRL)."""
    c = _recipe("abc_grpo_4b")
    assert c.model.name_or_path == "Qwen/Qwen3-4B-Base"
    assert c.algo.loss == "abc_grpo"
    assert c.algo.objective().params == {"eps1": 0.2, "eps2": 0.2, "eps3": 0.2, "eps4": 0.2}
    assert c.rollout.n_samples == 8  # G = 8
    # per_device_train_batch_size 4 x 8 GPUs x steps_per_generation 64 = 2,048 completions per
    # generation; 4 x gradient_accumulation_steps 16 x 8 GPUs = 512 per optimizer step
    assert c.sequences_per_step == 4 * 8 * 64
    assert c.trainer.mini_batch_size == 4 * 16 * 8
    assert c.updates_per_step == 4  # "each rollout batch is split into 4 mini-batches"
    assert c.updates_per_step * c.trainer.steps == 1340  # the released 4B run's optimizer steps
    assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (1024, 3072)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    assert c.trainer.lr == 1e-6 and c.trainer.lr_schedule == "cosine"
    assert c.trainer.lr_warmup_steps == round(0.1 * c.trainer.steps)  # warmup_ratio 0.1
    assert (c.trainer.weight_decay, c.trainer.grad_clip, c.trainer.seed) == (0.0, 1.0, 42)
    assert c.algo.kl_beta == 0.0
    assert c.algo.advantage == "grpo"  # scale_rewards: true
    assert c.algo.objective().agg == "token-mean"  # TRL's loss_type "dapo"
    assert c.data.instruction == ("Please reason step by step, and put your final answer "
                                  "within \\boxed{}.")
    assert [Path(e).name for e in c.data.eval] == ["aime", "amc"]
    assert c.eval.k == 64 and 64 in c.eval.reported_ks()  # Avg@64, Pass@2..64


def test_bapo_recipe_matches_paper_and_authors_script() -> None:
    """BAPO (Xi et al., arXiv:2510.18927) §5.1 (bound search) and the authors'
    recipe/bapo/run_bapo_example.sh (batch)."""
    c = _recipe("bapo_7b")
    assert c.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert c.algo.loss == "bapo"
    p = c.algo.objective().params
    # rho0 = 0.4, a- = 0.6, b- = 0.9, a+ = 1.2, b+ = 3.0, delta1 = 0.05, delta2 = 0.02
    assert (p["rho0"], p["c_low_min"], p["c_low_max"], p["c_high_min"], p["c_high_max"]) == (
        0.4, 0.6, 0.9, 1.2, 3.0)
    assert (p["step_high"], p["step_low"]) == (0.05, 0.02)
    assert (p["search_order"], p["target"]) == ("upper_first", "rho")  # Algorithm 1, Eq. 8
    assert p["c_low"] is None and p["c_high"] is None  # searched on every update
    assert p["dual_clip_c"] is None
    assert c.algo.advantage == "grpo" and c.algo.kl_beta == 0.0
    # the script: 256 prompts x 16, mini-batch 64 prompts, 2 epochs: staleness 8
    assert (c.trainer.prompts_per_step, c.rollout.n_samples) == (256, 16)
    assert c.trainer.mini_batch_size == 64 * 16 and c.trainer.epochs == 2
    assert c.updates_per_step == 2 * 256 // 64 == 8
    assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (1024, 8192)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, -1)
    assert (c.trainer.lr, c.trainer.weight_decay) == (1e-6, 0.1)
    assert c.trainer.lr_warmup_steps == 0.1 * c.trainer.steps and c.trainer.steps == 1000
    assert c.algo.overlong_buffer == 0
    assert (c.data.train, c.data.split) == ("Skywork/Skywork-OR1-RL-Data", "math")
    assert [Path(e).name for e in c.data.eval] == ["aime"]
    assert c.eval.k == 16  # "averaged over 16 rollouts"
    assert c.model.hf_config == _recipe("dgpo_7b").model.hf_config  # checked there


# The checkpoints' config.json, against the model cards: (layers, hidden, heads, KV heads, vocab,
# max positions, tied embeddings), total and non-embedding parameters in B.
MODEL_CARDS = {
    "up_gspo_30b": ((48, 2048, 32, 4, 151936, 32768, False), 30.5, 29.9),
    "up_dapo_14b": ((40, 5120, 40, 8, 151936, 32768, False), 14.8, 13.2),
    "up_grpo_8b": ((36, 4096, 32, 8, 151936, 40960, False), 8.2, 6.95),
    "abc_grpo_4b": ((36, 2560, 32, 8, 151936, 32768, True), 4.0, 3.6),
    "dgpo_7b": ((28, 3584, 28, 4, 152064, 131072, False), 7.61, 6.53),
}


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_hf_configs_are_the_real_models(name: str) -> None:
    """The inline config.json lets plan and validation work offline; it must be the real one."""
    c = _recipe(name)
    f = c.model.facts()
    hf = c.model.known_config()
    shape, total, non_embedding = MODEL_CARDS[name]
    assert f.complete
    assert (f.num_layers, f.hidden_size, f.num_attention_heads, f.num_query_groups,
            f.vocab_size, f.max_position_embeddings, hf["tie_word_embeddings"]) == shape
    n = count_params(c.model.known_config())
    for count, card in ((n.total, total), (n.non_embedding, non_embedding)):
        unit = 10.0 ** -len(str(card).partition(".")[2])  # the card's last digit
        assert abs(count / 1e9 - card) <= unit, (count, card)
    assert hf["architectures"][0].lower().startswith(hf["model_type"].replace("_", ""))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_fits_the_gpus_it_names(path: Path) -> None:
    """`megarl plan`'s memory estimate: every phase of the colocated run fits an 80 GB H100
    (parallel.gpu_memory_gib 79.1) with the recipe's own world size."""
    c = load_config(path)
    assert c.parallel.gpu_memory_gib == 79.1
    assert c.parallel.world_size is not None
    if path.stem in CPU_CONFIGS:
        assert c.parallel.world_size == 1
    else:
        assert c.parallel.world_size % 8 == 0  # whole nodes of 8 GPUs
    m = estimate_memory(c)
    assert m.fits, m.verdict()
    assert m.kv_cache_sequences >= 1  # vLLM holds at least one full-length sequence
    memory = next(rows for title, rows in plan_sections(c) if title.startswith("Memory"))
    assert dict(memory)["verdict"] == "fits on 79.1 GiB GPUs (parallel.gpu_memory_gib): yes"




def _leaves(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items()
                for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def test_the_real_model_example_scales_to_a_cluster_by_model_data_and_sizes_only() -> None:
    """qwen3_30b_arith.yaml is smollm2_arith.yaml on 32 H100s: the same fields, and only the
    model, the data's difficulty, the sizes and the engine differ (nothing of the CPU example
    is special-cased in megarl)."""
    import yaml

    small, large = (_leaves(yaml.safe_load((ROOT / "examples" / "configs" / f"{n}.yaml")
                                           .read_text())) for n in ("smollm2_arith",
                                                                    "qwen3_30b_arith"))
    allowed = ("model.name_or_path", "model.dtype", "model.hf_config.", "parallel.",
               "data.reasoning_gym.", "rollout.engine", "rollout.tp", "rollout.n_samples",
               "rollout.max_prompt_len", "rollout.max_response_len",
               "rollout.gpu_memory_utilization", "algo.old_logprobs", "trainer.steps",
               "trainer.prompts_per_step", "trainer.mini_batch_size",
               "trainer.micro_batch_size", "trainer.lr", "logging.run_name")
    differ = {k for k in small.keys() | large.keys() if small.get(k) != large.get(k)}
    assert differ, "the two files are the same"
    assert all(k.startswith(allowed) for k in differ), sorted(
        k for k in differ if not k.startswith(allowed))
    for key in ("algo.loss", "data.train", "data.eval", "data.reward", "data.template",
                "rollout.temperature", "eval.greedy", "trainer.eval_before_train"):
        assert small[key] == large[key], key
    assert load_config(ROOT / "examples" / "configs" / "qwen3_30b_arith.yaml").model.dtype == \
        "bfloat16"
