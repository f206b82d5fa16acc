"""The checkpoint converters as users run them: tools/convert_*.py and ``megarl convert``.

One real round trip per model family lives in tests/distributed (with logits in every
layout); here: the CLI end to end on a tiny Qwen3-MoE, and every bad input failing with one
``error:`` line that names the problem, leaving nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.convert.hf_io import HFCheckpoint

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def run(*args: str, tool: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(TOOLS / f"convert_{tool}.py")] if tool else \
        [sys.executable, "-m", "megarl", "convert"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers Qwen3-MoE (2 layers, 8 experts top-2, GQA 4:1, qk-norm) with a
    tokenizer file next to it."""
    import transformers

    from tests.distributed.conversion_cases import TINY_HF

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**TINY_HF["qwen3_moe"])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return root


def test_round_trip_through_both_tools_is_bit_identical(tiny_moe: Path) -> None:
    r = run("--hf", str(tiny_moe / "hf"), "--out", str(tiny_moe / "mcore"), "--tp", "2",
            "--ep", "4", "--quiet", tool="hf_to_megatron")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and (tiny_moe / "mcore" / "metadata.json").is_file()
    layout = json.loads((tiny_moe / "mcore" / "megarl_target_layout.json").read_text())
    assert (layout["tp"], layout["ep"]) == (2, 4)
    r = run("megatron-to-hf", "--megatron", str(tiny_moe / "mcore"), "--out",
            str(tiny_moe / "back"), "--shard-size-gb", "0.00005", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    source, back = HFCheckpoint(tiny_moe / "hf"), HFCheckpoint(tiny_moe / "back")
    assert sorted(source.names()) == sorted(back.names())
    for name in source.names():
        assert torch.equal(source.tensor(name), back.tensor(name)), name
    assert back.config == source.config
    assert (tiny_moe / "back" / "tokenizer_config.json").is_file()
    index = json.loads((tiny_moe / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards with an index


def test_bad_paths_are_one_line_errors(tiny_moe: Path, tmp_path: Path) -> None:
    line = one_error_line(run("hf-to-megatron", "--hf", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o")))
    assert "nope" in line and "not a directory" in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(run("hf-to-megatron", "--hf", str(tmp_path / "empty"), "--out",
                              str(tmp_path / "o")))
    assert "config.json" in line
    line = one_error_line(run("--megatron", str(tiny_moe / "hf"), "--out", str(tmp_path / "o"),
                              tool="megatron_to_hf"))
    assert "not a megatron distributed checkpoint" in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    line = one_error_line(run("hf-to-megatron", "--hf", str(tiny_moe / "hf"), "--out",
                              str(tmp_path / "full")))
    assert "--overwrite" in line and (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_incompatible_layout_names_the_flag(tiny_moe: Path, tmp_path: Path) -> None:
    line = one_error_line(run("hf-to-megatron", "--hf", str(tiny_moe / "hf"), "--out",
                              str(tmp_path / "o"), "--tp", "3"))
    assert line.startswith("error: --tp 3") and "attention heads" in line
    line = one_error_line(run("hf-to-megatron", "--hf", str(tiny_moe / "hf"), "--out",
                              str(tmp_path / "o"), "--ep", "3"))
    assert line.startswith("error: --ep 3") and "experts" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["removed", "renamed"])
def test_a_missing_expert_tensor_is_named(tiny_moe: Path, tmp_path: Path, damage: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_moe / "hf", broken)
    (file,) = broken.glob("*.safetensors")
    tensors = load_file(file)
    victim = "model.layers.1.mlp.experts.5.up_proj.weight"
    tensor = tensors.pop(victim)
    if damage == "renamed":
        tensors["model.layers.1.mlp.experts.5.up.weight"] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
    line = one_error_line(run("hf-to-megatron", "--hf", str(broken), "--out",
                              str(tmp_path / "o")))
    assert victim in line
    if damage == "renamed":
        assert "model.layers.1.mlp.experts.5.up.weight" in line
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_checkpoint_of_another_model_is_refused_by_name(tiny_moe: Path, tmp_path: Path) -> None:
    """A distributed checkpoint read with a config of more experts names the tensor whose
    shape differs instead of loading garbage."""
    source = tiny_moe / "mcore"
    if not source.exists():
        r = run("hf-to-megatron", "--hf", str(tiny_moe / "hf"), "--out", str(source), "--quiet")
        assert r.returncode == 0, r.stderr[-3000:]
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_moe / "hf" / "config.json").read_text())
    config["num_experts"] = 16
    (other / "config.json").write_text(json.dumps(config))
    line = one_error_line(run("megatron-to-hf", "--megatron", str(source), "--out",
                              str(tmp_path / "o"), "--hf-config", str(other)))
    assert "mlp.router.weight" in line and "(16, 32)" in line
    assert not (tmp_path / "o").exists()
