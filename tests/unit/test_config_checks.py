"""Issue 18, "every field checked, before anything starts": the HF config's fields, YAML alias
bombs, the paths `train` reads, and a start-up without a wall of library warnings.

Every config case runs the real CLI (``python -m megarl plan|train``) and must end with exit
status 2, exactly one ``error:`` line on stderr, no traceback, and no run directory.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from megarl.config import load_config, read_yaml
from megarl.config_yaml import MAX_YAML_VALUES
from megarl.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"


def megarl(*args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "MEGARL_LOG_LEVEL"}
    env = {**base, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "megarl", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(tmp_path: Path, args: tuple[str, ...], expected: str,
                   commands: tuple[str, ...] = ("plan", "train")) -> None:
    """Each command exits 2 with one ``error:`` line starting with ``expected``, no traceback,
    and leaves no run directory."""
    runs = tmp_path / "runs"
    for command in commands:
        r = megarl(command, *args, f"logging.dir={runs}")
        assert r.returncode == 2, (command, args, r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, (command, args, lines[:20])
        assert lines[0].startswith(expected), (command, args, lines[0])
        assert not runs.exists(), (command, args)


# --------------------------------------------------------------------------------------------
# model.hf_config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.hf_config.vocab_size=-1", "error: model.hf_config.vocab_size=-1: must be an int "
                                          ">= 1"),
        ("model.hf_config.hidden_size=0", "error: model.hf_config.hidden_size=0: must be an int "
                                          ">= 1"),
        ("model.hf_config.num_expert=8", "error: model.hf_config.num_expert=8: not a field of "
                                         "the qwen3_moe, qwen3, qwen2, llama HF configs (did you "
                                         "mean 'model.hf_config.num_experts'?)"),
        ("model.hf_config.num_key_value_heads=3", "error: model.hf_config.num_key_value_heads=3: "
                                                  "must divide num_attention_heads=2"),
        ("model.hf_config.rms_norm_eps=0", "error: model.hf_config.rms_norm_eps=0: must be a "
                                           "finite number > 0"),
        ("model.hf_config.rope_theta=.inf", "error: model.hf_config.rope_theta=inf: must be a "
                                            "finite number > 0"),
        ("model.hf_config.tie_word_embeddings=1", "error: model.hf_config.tie_word_embeddings=1: "
                                                  "must be true or false"),
        ("model.hf_config.vocab_size='32'", "error: model.hf_config.vocab_size='32': must be an "
                                            "int >= 1"),
    ],
    ids=["vocab", "hidden", "typo", "kv-heads", "eps", "rope-inf", "bool", "string-int"],
)
def test_hf_config_fields_are_checked_by_plan_and_train(tmp_path: Path, override: str,
                                                        expected: str) -> None:  # fmt: skip
    assert_refused(tmp_path, (QUICKSTART, override), expected)


def test_hf_config_divisibility_without_head_dim(tmp_path: Path) -> None:
    assert_refused(tmp_path, (QUICKSTART, "model.hf_config.head_dim=null",
                              "model.hf_config.hidden_size=65"),
                   "error: model.hf_config.num_attention_heads=2: must divide hidden_size=65")


def test_a_local_checkpoints_config_json_is_checked_too(tmp_path: Path) -> None:
    hf = load_config(ROOT / QUICKSTART).model.hf_config
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 0}))
    assert_refused(tmp_path, (QUICKSTART, f"model.name_or_path={checkpoint}",
                              "model.hf_config={}"),
                   "error: model.hf_config.num_hidden_layers=0: must be an int >= 1")


def _config_error(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / QUICKSTART, list(overrides))
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        (["model.hf_config.num_experts=-1"], "num_experts", "int >= 0"),
        (["model.hf_config.num_experts_per_tok=5"], "num_experts_per_tok", "<= num_experts=4"),
        (["model.hf_config.num_experts_per_tok=null"], "num_experts_per_tok", "required"),
        (["model.hf_config.moe_intermediate_size=null"], "moe_intermediate_size", "required"),
        (["model.hf_config.model_type=qwen3"], "num_experts", "dense architecture"),
        (["model.hf_config.model_type=mixtral"], "model_type", "supported: qwen3_moe"),
        (["model.hf_config.vocab_size=null"], "vocab_size", "required"),
        (["model.hf_config.max_position_embeddings=0"], "max_position_embeddings", ">= 1"),
        (["model.hf_config.mlp_only_layers=[2]"], "mlp_only_layers", "[0, num_hidden_layers=2)"),
        (["model.hf_config.hidden_act=gelu"], "hidden_act", "silu"),
        (["model.hf_config.use_sliding_window=true"], "use_sliding_window", "not supported"),
        (["model.hf_config.attention_bias=true"], "attention_bias", "o_proj"),
        (["model.hf_config.rope_parameters={rope_type: yarn}"], "rope_parameters.rope_type",
         "default, llama3"),
        (["model.hf_config.rope_scaling={factor: -2}"], "rope_scaling.factor", "> 0"),
        (["model.hf_config.initializer_range=.nan"], "initializer_range", "finite"),
        (["model.hf_config.architectures=Qwen3MoeForCausalLM"], "architectures", "a list"),
    ],
)
def test_hf_config_ranges_and_combinations(overrides: list[str], field: str,
                                           allowed: str) -> None:  # fmt: skip
    err = _config_error(*overrides)
    assert err.field == f"model.hf_config.{field}"
    assert allowed in err.allowed


def test_valid_hf_configs_pass() -> None:
    """Nulls are transformers' defaults; dense models need no expert fields; legacy keys of
    released checkpoints (rope_theta, rope_scaling, torch_dtype) are known."""
    load_config(ROOT / QUICKSTART, ["model.hf_config.num_experts=null",
                                    "model.hf_config.model_type=qwen3",
                                    "model.hf_config.torch_dtype=bfloat16",
                                    "model.hf_config.rope_scaling=null",
                                    "model.hf_config.mlp_only_layers=[1]"])
    load_config(ROOT / QUICKSTART, ["model.hf_config.head_dim=null",
                                    "model.hf_config.hidden_size=66"])


def test_known_hf_keys_cover_transformers_config_classes() -> None:
    """`HF_KEYS` is written out (validation must not import transformers); this keeps it in
    step with the installed transformers' classes for every supported architecture."""
    from transformers import CONFIG_MAPPING

    from megarl.convert.mapping import SUPPORTED as MAPPED
    from megarl.hf_checks import HF_KEYS, SUPPORTED

    assert MAPPED == SUPPORTED
    for model_type in SUPPORTED:
        cls = CONFIG_MAPPING[model_type]
        keys = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        keys |= set(cls.attribute_map) | set(cls().to_dict())
        assert keys <= HF_KEYS, (model_type, sorted(keys - HF_KEYS))


# --------------------------------------------------------------------------------------------
# YAML alias bombs
# --------------------------------------------------------------------------------------------


def _bomb(levels: int = 7) -> str:
    lines = ["      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    """1.4 KB, 7 levels, 10^8 values once expanded, under a key nothing else checks."""
    text = (ROOT / QUICKSTART).read_text()
    anchor = "  hf_config:                  # an HF-style Qwen3-MoE config.json, tiny\n"
    assert anchor in text
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text.replace(anchor, "  hf_config:\n    id2label:\n" + _bomb()))
    started = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than"):
        read_yaml(bomb)
    assert time.perf_counter() - started < 1.0
    assert_refused(tmp_path, (str(bomb),), f"error: {bomb}: the YAML expands to more than "
                                           f"{MAX_YAML_VALUES:,} values")


def test_alias_bomb_in_an_override_and_recursive_or_deep_yaml(tmp_path: Path) -> None:
    layers = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcd", "bcde", strict=True)) + "]"
    assert_refused(tmp_path, (QUICKSTART, f"model.hf_config.id2label={{x: {layers}}}"),
                   "error: model.hf_config.id2label=", commands=("plan",))
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("model:\n  hf_config:\n    id2label: &a {x: *a}\n")
    assert_refused(tmp_path, (str(recursive),), f"error: {recursive}: a YAML alias refers to a "
                                                "node that contains it", commands=("plan",))
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_refused(tmp_path, (str(deep),), f"error: {deep}: invalid YAML: nested too deeply",
                   commands=("plan",))


def test_shared_anchors_of_a_normal_size_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval: &bench [toy:arithmetic]\n  train: toy:arithmetic\n"
                    "x: &big [" + ", ".join(["1"] * 1000) + "]\ny: [*big, *big, *big]\n")
    data = read_yaml(path)
    assert data["y"][2] is data["x"] and len(data["x"]) == 1000


# --------------------------------------------------------------------------------------------
# Paths that train reads
# --------------------------------------------------------------------------------------------


def _checkpoint(root: Path, *, weights: bool = True) -> Path:
    hf = load_config(ROOT / QUICKSTART).model.hf_config
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(hf))
    if weights:
        (root / "model.safetensors").write_bytes(b"\0")
    return root


def test_paths_train_reads_are_checked_by_plan_and_before_train_builds(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = _checkpoint(tmp_path / "no-weights", weights=False)
    cases = [
        (("model.name_or_path=/no/such/checkpoint",),
         "error: model.name_or_path='/no/such/checkpoint': no such directory"),
        (("model.name_or_path=SomeOrg/not-downloaded",),
         "error: model.name_or_path='SomeOrg/not-downloaded': not a local checkpoint directory: "
         "download it (huggingface-cli download SomeOrg/not-downloaded --local-dir DIR)"),
        ((f"model.name_or_path={empty}",), f"error: model.name_or_path='{empty}': no config.json"),
        ((f"model.name_or_path={no_weights}", "model.random_init=false"),
         f"error: model.name_or_path='{no_weights}': no *.safetensors weights"),
        (("model.tokenizer=./no/such/tokenizer",),
         "error: model.tokenizer='./no/such/tokenizer': no such directory"),
        ((f"model.tokenizer={empty}",), f"error: model.tokenizer='{empty}': holds no tokenizer"),
        (("data.train=/no/such/train.jsonl",),
         "error: data.train='/no/such/train.jsonl': no such file or directory"),
        (("data.train=toy:nosuch",), "error: data.train='toy:nosuch': unknown toy task"),
        (("data.eval=[toy:arithmetic, ./no/such/aime@test]",),
         "error: data.eval='./no/such/aime': no such file or directory"),
        (("checkpoint.resume=/no/such/step_000010",),
         "error: checkpoint.resume='/no/such/step_000010': no such directory: give a step_* "
         "checkpoint directory, 'auto'"),
        ((f"checkpoint.resume={empty}",),
         f"error: checkpoint.resume='{empty}': not a complete megarl checkpoint (no COMPLETE"),
    ]
    for overrides, expected in cases:
        assert_refused(tmp_path, (QUICKSTART, *overrides), expected)


def test_plan_passes_with_every_path_present_and_can_skip_the_checks(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ckpt")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    train = tmp_path / "train.jsonl"
    train.write_text('{"problem": "1+1", "answer": "2"}\n')
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    r = megarl("plan", QUICKSTART, f"model.name_or_path={checkpoint}", "model.hf_config={}",
               f"model.tokenizer={tokenizer}", f"data.train={train}", "data.template=plain",
               f"data.eval=[{train}@train]", f"checkpoint.resume={step}")
    assert r.returncode == 0, r.stderr
    assert "checked on this machine" in r.stdout
    r = megarl("plan", QUICKSTART, "checkpoint.resume=/on/the/cluster/step_000002",
               "--skip-path-checks")
    assert r.returncode == 0, r.stderr
    assert "not checked (--skip-path-checks)" in r.stdout


def test_train_checks_paths_before_the_trainer_is_built(tmp_path: Path, monkeypatch,
                                                        capsys) -> None:  # fmt: skip
    """In process: a bad path ends `megarl train` before `Trainer` (which builds the model for
    11-26 s on the CPU before it reads the checkpoint to resume) is constructed."""
    from megarl.cli import main

    built = []
    fake = types.ModuleType("megarl.trainer")
    fake.Trainer = lambda config: built.append(config)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "megarl.trainer", fake)
    monkeypatch.setattr("megarl.startup.quiet_libraries", lambda **_: None)
    status = main(["train", str(ROOT / QUICKSTART), f"logging.dir={tmp_path / 'runs'}",
                   "checkpoint.resume=/no/such/step_000010"])
    assert status == 2 and built == []
    assert capsys.readouterr().err.startswith("error: checkpoint.resume=")
    # benchmarks a run never evaluates (trainer.eval_every=0) are not read, so not checked
    fake.Trainer = lambda config: types.SimpleNamespace(fit=lambda: built.append(config))
    assert main(["train", str(ROOT / QUICKSTART), "trainer.eval_every=0",
                 "data.eval=[./no/such/benchmark]"]) == 0
    assert len(built) == 1


def test_eval_checks_what_it_reads_before_building(tmp_path: Path, monkeypatch,
                                                   capsys) -> None:  # fmt: skip
    """`megarl eval` checks the model, tokenizer, data.eval and ``--checkpoint``; not data.train
    or checkpoint.resume, which it does not read; an HF ``--checkpoint`` replaces the model."""
    from megarl.cli import main

    def evaluate_checkpoint(config: object, checkpoint: str | None) -> None:
        raise UserError("reached the evaluation")

    fake = types.ModuleType("megarl.evaluate")
    fake.evaluate_checkpoint = evaluate_checkpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "megarl.evaluate", fake)
    monkeypatch.setattr("megarl.startup.quiet_libraries", lambda **_: None)
    hf = _checkpoint(tmp_path / "hf")
    quickstart = str(ROOT / QUICKSTART)
    cases = [
        (["model.name_or_path=/no/such/model"], "error: model.name_or_path='/no/such/model': "
                                                 "no such directory"),
        (["data.eval=[./no/such/aime]"], "error: data.eval='./no/such/aime': no such file"),
        (["--checkpoint", "/no/such/run"], "error: checkpoint /no/such/run: not a directory"),
        (["model.name_or_path=SomeOrg/not-downloaded", "--checkpoint", str(hf)],
         "error: reached the evaluation"),
        (["data.train=/no/such.jsonl", "checkpoint.resume=/no/such"],
         "error: reached the evaluation"),
    ]
    for args, expected in cases:
        assert main(["eval", quickstart, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, (args, err)


# --------------------------------------------------------------------------------------------
# A quiet start-up
# --------------------------------------------------------------------------------------------

_NOISE = ("warn", "deprecat", "experimental", "falling back", "no cuda runtime")


@pytest.mark.slow
def test_train_start_up_prints_no_library_warnings(tmp_path: Path) -> None:
    """The quickstart trains a step: stderr holds at most the one backends note, none of the
    13-19 lines megatron-core, Apex, Transformer Engine, Mimo and torch printed."""
    r = megarl("train", QUICKSTART, "trainer.steps=1", "trainer.eval_every=0",
               f"logging.dir={tmp_path / 'runs'}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) <= 1, lines
    assert all(line.startswith("note: ") for line in lines), lines
    assert not [line for line in lines for word in _NOISE if word in line.lower()
                and not line.startswith("note: ")]
    if importlib.util.find_spec("transformer_engine") is None:
        assert lines and "Transformer Engine" in lines[0] and "megarl[te]" in lines[0]


_SNIPPET = """
import importlib.util, logging, os, warnings
from megarl.startup import quiet_libraries
quiet_libraries()
megatron = importlib.util.find_spec("megatron").submodule_search_locations[0]
warnings.warn_explicit("hidden-library-warning", UserWarning,
                       os.path.join(megatron, "core", "x.py"), 1)
logging.getLogger("megatron.core.x").warning("hidden-library-log")
logging.getLogger("torch.utils.cpp_extension").warning("hidden-torch-log")
logging.getLogger("megatron.core.x").error("shown-library-error")
warnings.warn("shown-own-warning")
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_library_noise_goes_to_debug_and_errors_stay(rank: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEGARL_LOG_LEVEL"}
    env["RANK"] = rank
    quiet = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    assert "shown-library-error" in quiet.stderr and "shown-own-warning" in quiet.stderr
    assert "hidden" not in quiet.stderr
    notes = [line for line in quiet.stderr.splitlines() if line.startswith("note: ")]
    has_note = importlib.util.find_spec("transformer_engine") is None
    assert len(notes) == (1 if has_note and rank == "0" else 0)  # rank 0 only, under torchrun
    silent = subprocess.run([sys.executable, "-c", "from megarl.startup import quiet_libraries; "
                             "quiet_libraries()"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert silent.returncode == 0 and silent.stderr == ""  # the note waits for a library
    debug = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT,
                           env={**env, "MEGARL_LOG_LEVEL": "debug"}, capture_output=True,
                           text=True, timeout=60)
    for word in ("hidden-library-warning", "hidden-library-log", "hidden-torch-log"):
        assert word in debug.stderr
