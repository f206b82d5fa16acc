"""The ``megarl`` command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"


def megarl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "megarl", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_help_lists_the_subcommands() -> None:
    r = megarl("--help")
    assert r.returncode == 0
    for command in ("train", "eval", "convert", "plan"):
        assert command in r.stdout


def test_version() -> None:
    from megarl import __version__

    r = megarl("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"megarl {__version__}"


def test_plan_prints_the_quickstart_run() -> None:
    from megarl.losses import POLICY_LOSSES

    r = megarl("plan", QUICKSTART)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    spec = POLICY_LOSSES["up_gspo"]
    assert f"up_gspo: {spec.summary[:30]}" in out
    assert f"{spec.default_agg} (the loss's default)" in out
    for name, value in spec.defaults.items():
        assert f"{name}={value}" in out
    assert "qwen3_moe" in out
    assert "4 / 2" in out  # experts / top-k
    assert "TP=1 PP=1 CP=1 DP=1" in out
    assert "EP=1 ETP=1" in out
    assert "grpo" in out
    assert "128" in out  # 16 prompts x 8 samples
    assert "64 -> 2 per epoch" in out
    assert "16 -> 4 per mini-batch" in out
    assert "R3 (the rollout engine's routes)" in out


def test_plan_applies_overrides() -> None:
    r = megarl("plan", QUICKSTART, "algo.loss=dapo", "algo.params.eps_high=0.3",
               "parallel.world_size=4", "trainer.micro_batch_size=4", "algo.agg=token-mean")
    assert r.returncode == 0, r.stderr
    assert "dapo:" in r.stdout
    assert "eps_high=0.3" in r.stdout
    assert "TP=1 PP=1 CP=1 DP=4" in r.stdout
    assert "token-mean" in r.stdout and "the loss's default" not in r.stdout


def test_train_validates_the_config_first() -> None:
    r = megarl("train", QUICKSTART, "trainer.steps=-1")
    assert r.returncode == 2
    assert r.stderr.startswith("error: trainer.steps=-1")


def test_bad_override_is_one_line_without_traceback() -> None:
    r = megarl("plan", QUICKSTART, "trainer.stesp=3")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: trainer.stesp=3: unknown key")
    assert "did you mean 'trainer.steps'" in lines[0]


def test_bad_loss_param_and_missing_file() -> None:
    r = megarl("plan", QUICKSTART, "algo.params.eps_low=1.5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: algo.params.eps_low=1.5")
    r = megarl("plan", "no/such/file.yaml")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: config file not found: no/such/file.yaml"


def test_main_in_process_returns_the_status(capsys) -> None:
    from megarl.cli import main

    assert main(["plan", str(ROOT / QUICKSTART), "trainer.steps=0"]) == 2
    assert capsys.readouterr().err.startswith("error: trainer.steps=0")


def test_non_finite_floats_bad_encoding_and_file_dirs_are_one_line(tmp_path: Path) -> None:
    """Issue 18's config cases: inf / nan in any float field, a config that is not UTF-8, a run
    or checkpoint directory that is a file: exit 2, one ``error:`` line, no traceback, and
    ``train`` leaves no run directory behind."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    bad_utf8 = tmp_path / "bad.yaml"
    bad_utf8.write_bytes(b"trainer:\n  steps: 3 # \xff\xfe\n")
    cases = [
        ((QUICKSTART, "trainer.lr=.inf"), "error: trainer.lr=inf: must be a finite number"),
        ((QUICKSTART, "rollout.temperature=.nan"), "error: rollout.temperature=nan: must be a "
                                                    "finite number"),
        ((QUICKSTART, "algo.kl_beta=-.inf"), "error: algo.kl_beta=-inf: must be a finite"),
        ((str(bad_utf8),), f"error: {bad_utf8}: not UTF-8 text (byte 22"),
        ((QUICKSTART, f"logging.dir={a_file}"), f"error: logging.dir='{a_file}': is a file"),
        ((QUICKSTART, f"checkpoint.dir={a_file}"), f"error: checkpoint.dir='{a_file}': is a "
                                                   "file"),
    ]
    runs = tmp_path / "runs"
    for args, expected in cases:
        for command in ("plan", "train"):
            extra = () if "logging.dir" in " ".join(args) else (f"logging.dir={runs}",)
            r = megarl(command, *args, *extra)
            assert r.returncode == 2, (command, args, r.stderr[-2000:])
            assert "Traceback" not in r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(expected), (command, args, lines)
    assert not runs.exists()
