"""benchmarks/experts.py runs end to end at tiny shapes (``--smoke``): its check phase (grouped
experts vs SequentialMLP vs an fp32 reference, with empty experts) passes and it writes the
record the GPU run writes. In a subprocess: the script installs megatron's CPU shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_checks_and_records(tmp_path: Path) -> None:
    out = tmp_path / "experts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experts.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    check = record["check"]
    assert check["passed"] and check["failed"] == [], check
    assert check["empty_experts"] == 2 and check["empty_expert_grad_max"] == 0.0
    # every implementation is compared with an fp32 reference, and is bf16-close to it; the
    # fused activation rounds differently, so the bf16 tolerances are exercised for real
    assert all(0 < e < 2e-2 for v in check["vs_fp32"].values() for e in v.values()), check
    assert all(0 < v < 2e-2 for v in check["fused_act_vs_sequential"].values()), check
    assert set(record["timings"]) == {"sequential", "grouped", "grouped-fused-act",
                                      "stacked-copy", "gemms-only"}
    for row in record["timings"].values():
        assert row["ms"] > 0 and row["gemm_tflops"] > 0 and row["speedup_vs_sequential"] > 0
    shapes = record["shapes"]
    assert shapes["routed_tokens"] == shapes["tokens"] * shapes["topk"] == 128
    assert shapes["fc1_weight"] == [8, 64, 64] and shapes["fc2_weight"] == [8, 64, 32]
    assert {"torch", "megatron_core", "gpu"} <= set(record["environment"])
    assert "| grouped |" in proc.stdout and "check: PASS" in proc.stdout
