"""Config loading, dotted overrides and validation (one-line errors naming the field)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megarl.config import Config, ParallelConfig, load_config
from megarl.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"


def quick(*overrides: str) -> Config:
    return load_config(QUICKSTART, list(overrides))


def config_error(*overrides: str, path: Path = QUICKSTART) -> ConfigError:
    """The ConfigError raised by loading ``path`` with ``overrides``; checks it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"{err.field}=")
    return err


def test_quickstart_loads_and_validates() -> None:
    c = quick()
    assert c.model.hf_config["model_type"] == "qwen3_moe"
    facts = c.model.facts()
    assert (facts.num_layers, facts.hidden_size, facts.num_experts) == (2, 64, 4)
    assert facts.moe_router_topk == 2
    assert c.parallel.data_parallel_size() == 1
    assert c.rollout.engine == "hf"
    assert c.algo.loss == "up_gspo"
    assert c.sequences_per_step == 16 * 8
    assert c.updates_per_step == 2


def test_overrides_scalars_nested_lists_and_null() -> None:
    c = quick(
        "trainer.lr=1e-5",
        "trainer.min_lr=0",
        "trainer.steps=7",
        "model.hf_config.num_experts=8",
        "logging.sinks=[console, tensorboard]",
        "algo.agg=null",
        "rollout.temperature=0.7",
        "checkpoint.save_every=5",
    )
    assert c.trainer.lr == 1e-5 and isinstance(c.trainer.lr, float)
    assert c.trainer.steps == 7
    assert c.model.facts().num_experts == 8
    assert c.model.hf_config["hidden_size"] == 64  # siblings of an overridden key survive
    assert c.logging.sinks == ["console", "tensorboard"]
    assert c.algo.agg is None
    assert c.rollout.temperature == 0.7
    assert c.checkpoint.save_every == 5


def test_int_is_accepted_for_a_float_field() -> None:
    c = quick("rollout.temperature=1")
    assert c.rollout.temperature == 1.0 and isinstance(c.rollout.temperature, float)


def test_yaml_scientific_notation_is_a_float(tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["trainer"]["lr"] = 1.0  # a placeholder, replaced by scientific notation below
    text = yaml.safe_dump(data).replace("lr: 1.0", "lr: 5e-3")
    assert "lr: 5e-3" in text
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path).trainer.lr == 5e-3


def test_unknown_top_level_key_suggests_the_section() -> None:
    err = config_error("trainr.steps=3")
    assert err.field == "trainr"
    assert "did you mean 'trainer'" in str(err)


def test_unknown_nested_key_suggests_the_field() -> None:
    err = config_error("trainer.stesp=3")
    assert err.field == "trainer.stesp"
    assert "did you mean 'trainer.steps'" in str(err)


def test_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["rollout"]["temprature"] = 0.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    err = config_error(path=path)
    assert err.field == "rollout.temprature"
    assert "did you mean 'rollout.temperature'" in str(err)


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("trainer.steps=ten", "trainer.steps", "must be an int"),
        ("trainer.steps=1.5", "trainer.steps", "must be an int"),
        ("trainer.steps=true", "trainer.steps", "must be an int"),
        ("trainer.lr=fast", "trainer.lr", "must be a number"),
        ("rollout.engine=sglang", "rollout.engine", "'hf', 'vllm'"),
        ("algo.kl_type=k4", "algo.kl_type", "'k1', 'k2', 'k3'"),
        ("logging.sinks=console", "logging.sinks", "must be a list"),
        ("logging.sinks=[console, mlflow]", "logging.sinks[1]", "'wandb'"),
        ("model.random_init=maybe", "model.random_init", "must be a bool"),
        ("model.logprob_kernel=cuda", "model.logprob_kernel", "'torch', 'triton', 'auto'"),
        ("parallel.etp=two", "parallel.etp", "an int or null"),
        ("trainer=5", "trainer", "must be a mapping"),
    ],
)
def test_wrong_types(override: str, field: str, allowed: str) -> None:
    err = config_error(override)
    assert err.field == field
    assert allowed in err.allowed


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        # layout vs world size
        (["parallel.tp=2", "parallel.dp=3", "parallel.world_size=8"], "parallel.dp", "must equal"),
        (["parallel.tp=4", "parallel.world_size=6"], "parallel.world_size", "multiple of"),
        (["parallel.ep=4", "parallel.world_size=2"], "parallel.ep", "must divide tp*cp*dp"),
        # layout vs the model's architecture
        (["parallel.world_size=null", "parallel.ep=3"], "parallel.ep", "4 experts"),
        (["parallel.world_size=null", "parallel.tp=4"], "parallel.tp", "2 attention heads"),
        (["parallel.world_size=null", "parallel.pp=4"], "parallel.pp", "2 layers"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "tp > 1"),
        (["model.hf_config.num_experts_per_tok=5"], "model.hf_config.num_experts_per_tok", "<="),
        (["rollout.max_response_len=200"], "rollout.max_response_len", "max_position"),
        # batch shapes
        (["trainer.mini_batch_size=48"], "trainer.mini_batch_size", "must divide"),
        (
            ["parallel.world_size=2", "trainer.mini_batch_size=64", "trainer.micro_batch_size=64"],
            "trainer.mini_batch_size",
            "dp*micro_batch_size",
        ),
        # rollout and algorithm
        (["rollout.tp=2"], "rollout.tp", "engine='hf'"),
        (
            ["rollout.engine=vllm", "rollout.tp=4", "parallel.world_size=6"],
            "rollout.tp",
            "world size 6",
        ),
        (["rollout.n_samples=1", "trainer.mini_batch_size=16"], "rollout.n_samples", ">= 2"),
        (["rollout.top_p=1.5"], "rollout.top_p", "(0, 1]"),
        (["rollout.temperature=0"], "rollout.temperature", "> 0"),
        (["algo.kl_beta=-0.1"], "algo.kl_beta", ">= 0"),
        (["trainer.epochs=0"], "trainer.epochs", ">= 1"),
        (["model.random_init=false"], "model.random_init", "name_or_path"),
    ],
)
def test_impossible_combinations(overrides: list[str], field: str, allowed: str) -> None:
    err = config_error(*overrides)
    assert err.field == field
    assert allowed in err.allowed


def test_dense_model_rejects_expert_parallel_and_replay() -> None:
    dense = ["model.hf_config.num_experts=null", "model.hf_config.model_type=qwen3"]
    err = config_error(*dense, "parallel.world_size=null", "parallel.ep=2")
    assert err.field == "parallel.ep" and "dense" in err.allowed
    err = config_error(*dense, "model.routing_replay=true")
    assert err.field == "model.routing_replay"
    assert quick(*dense).model.facts().is_moe is False


@pytest.mark.parametrize(
    ("value", "mode"),
    [("null", "r3"), ("r3", "r3"), ("r2", "r2"), ("off", "off"), ("true", "r3"), ("false", "off")],
)
def test_routing_replay_modes(value: str, mode: str) -> None:
    """YAML's bare off/true/false are booleans; each resolves to one of r3 / r2 / off."""
    c = quick(f"model.routing_replay={value}")
    assert c.model.replay_mode() == mode
    assert Config.from_dict(yaml.safe_load(c.to_yaml())).model.replay_mode() == mode


def test_routing_replay_rejects_bad_modes() -> None:
    err = config_error("model.routing_replay=r4")
    assert err.field == "model.routing_replay" and "'r3'" in err.allowed
    dense = ["model.hf_config.num_experts=null", "model.hf_config.model_type=qwen3"]
    assert quick(*dense).model.replay_mode() == "off"  # the default follows the model
    for mode in ("r2", "r3"):
        assert config_error(*dense, f"model.routing_replay={mode}").field == "model.routing_replay"
    err = config_error("model.routing_replay=r2", "algo.old_logprobs=rollout")
    assert err.field == "model.routing_replay" and "old_logprobs" in err.allowed


def test_weight_sync_and_vllm_rollout_options() -> None:
    c = quick("rollout.sync_bucket_mb=0.5", "rollout.moe_backend=auto")
    assert c.rollout.sync_bucket_bytes == 1 << 19
    assert quick().rollout.sync_bucket_bytes == 512 << 20
    assert config_error("rollout.sync_bucket_mb=0").field == "rollout.sync_bucket_mb"
    err = config_error("rollout.moe_backend=cutlass")
    assert err.field == "rollout.moe_backend" and "flashinfer_cutlass" in err.allowed
    assert quick().rollout.moe_backend == "auto" and quick().rollout.kv_cache_gib is None
    assert quick("rollout.kv_cache_gib=0.25").rollout.kv_cache_gib == 0.25
    for bad in ("0", "-1"):
        assert config_error(f"rollout.kv_cache_gib={bad}").field == "rollout.kv_cache_gib"


def test_malformed_override() -> None:
    err = config_error("trainer.steps")
    assert err.field == "override"
    assert "KEY=VALUE" in err.allowed
    assert config_error("trainer..steps=1").field == "override"


def test_override_through_a_scalar_is_rejected() -> None:
    err = config_error("trainer.steps.max=3")
    assert err.field == "trainer.steps"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {steps: 1\n")
    with pytest.raises(UserError, match="invalid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    dup = tmp_path / "dup.yaml"
    dup.write_text("trainer:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(UserError, match="duplicate key 'steps'"):
        load_config(dup)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def test_default_config_needs_a_model() -> None:
    err = config_error(path=None)  # type: ignore[arg-type]
    assert err.field == "model.name_or_path"


def test_round_trip_through_dict_and_yaml(tmp_path: Path) -> None:
    c = quick("trainer.lr=3e-6", "trainer.min_lr=0", "algo.params.eps_low=0.25", "parallel.etp=1")
    again = Config.from_dict(c.to_dict())
    assert again == c
    path = tmp_path / "resolved.yaml"
    c.save(path)
    assert load_config(path) == c
    assert c.to_dict()["algo"]["params"] == {"eps_low": 0.25}
    assert c.to_dict() is not c.to_dict()  # a copy, not a view


def test_parallel_resolve_and_world_size_check() -> None:
    p = ParallelConfig(tp=2, pp=2, ep=4, etp=1)
    r = p.resolve(16)
    assert (r.dp, r.world_size) == (4, 16)
    assert p.dp is None  # resolve returns a copy
    with pytest.raises(ConfigError) as info:
        p.resolve(6)
    assert info.value.field == "parallel.world_size"
    with pytest.raises(ConfigError) as info:
        ParallelConfig(world_size=8).resolve(4)
    assert info.value.field == "parallel.world_size"
    assert "launched with 4" in info.value.allowed
    assert ParallelConfig(tp=2).use_sequence_parallel is True
    assert ParallelConfig(tp=2).expert_tp == 2


# ---- the loss library's validation contract (megarl.losses / megarl.advantages) ----


def test_unknown_loss_is_rejected_by_the_loss_library() -> None:
    err = config_error("algo.loss=up_gspp")
    assert err.field == "algo.loss"
    assert "up_gspo" in err.allowed


def test_loss_params_are_validated_and_merged_with_defaults() -> None:
    from megarl.losses import POLICY_LOSSES

    defaults = POLICY_LOSSES["up_gspo"].defaults
    assert "eps_low" in defaults
    c = quick("algo.params.eps_low=0.1")
    assert c.algo.objective().params == {**defaults, "eps_low": 0.1}
    assert c.algo.objective().agg == POLICY_LOSSES["up_gspo"].default_agg
    err = config_error("algo.params.eps_low=1.5")
    assert err.field == "algo.params.eps_low"
    err = config_error("algo.params.eps_lo=0.1")
    assert err.field == "algo.params.eps_lo"


def test_every_registered_loss_validates() -> None:
    from megarl.losses import POLICY_LOSSES

    for name in POLICY_LOSSES:
        assert quick(f"algo.loss={name}").algo.loss == name


def test_agg_and_advantage_are_checked_against_the_libraries() -> None:
    from megarl.advantages import ADVANTAGE_ESTIMATORS
    from megarl.losses import AGG_MODES

    for agg in AGG_MODES:
        assert quick(f"algo.agg={agg}").algo.objective().agg == agg
    err = config_error("algo.agg=token-sum")
    assert err.field == "algo.agg"
    for adv in ADVANTAGE_ESTIMATORS:
        assert quick(f"algo.advantage={adv}").algo.advantage == adv
    err = config_error("algo.advantage=grop")
    assert err.field == "algo.advantage"
    assert "did you mean 'grpo'" in err.allowed


@pytest.mark.parametrize(("overrides", "field", "words"), [
    (["algo.overlong_buffer=4"], "algo.overlong_buffer", "max_response_len=3"),
    (["algo.overlong_buffer=-1"], "algo.overlong_buffer", ">= 0"),
    (["algo.overlong_penalty=-0.5"], "algo.overlong_penalty", ">= 0"),
    (["data.eval=[]"], "trainer.eval_every", "data.eval"),
    (["eval.k=4", "eval.ks=[8]"], "eval.ks", "[1, eval.k=4]"),
    (["eval.temperature=0"], "eval.temperature", "> 0"),
    (["eval.top_p=1.5"], "eval.top_p", "(0, 1]"),
    (["eval.max_problems=0"], "eval.max_problems", ">= 1"),
    (["data.train=m.jsonl", "data.train_filter={level: []}"], "data.train_filter.level",
     "at least one"),
    (["data.train=m.jsonl", "data.train_filter={level: [3.5]}"], "data.train_filter.level[0]",
     "a string or an int"),
    (["data.train_filter={level: [3]}"], "data.train_filter", "toy task"),
])
def test_eval_and_overlong_fields_are_checked(overrides: list[str], field: str,
                                              words: str) -> None:
    err = config_error(*overrides)
    assert err.field == field and words in str(err), str(err)


def test_train_filter_lists_values_per_column() -> None:
    c = quick("data.train=MATH.jsonl", "data.train_filter={level: [Level 3, 4], meta.src: [a]}")
    assert c.data.train_filter == {"level": ["Level 3", 4], "meta.src": ["a"]}
    assert quick().data.train_filter == {}
    assert Config.from_dict(c.to_dict()) == c


def test_eval_reports_powers_of_two_up_to_k() -> None:
    assert load_config(QUICKSTART, ["eval.k=12"]).eval.reported_ks() == [1, 2, 4, 8, 12]
    assert load_config(QUICKSTART, ["eval.k=4", "eval.ks=[4,1]"]).eval.reported_ks() == [1, 4]
