"""benchmarks/logprobs.py runs end to end: ``--smoke`` (tiny shapes, CPU, the torch fallback of
``impl='auto'``) goes through the check phase, the timing and the memory measurement, and writes
the JSON the H100 run writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    path = ROOT / "benchmarks" / "logprobs.py"
    spec = importlib.util.spec_from_file_location("bench_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_results(tmp_path: Path, capsys) -> None:
    bench = _bench()
    out = tmp_path / "logprobs.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["check_passed"] and result["device"] == "cpu"
    assert result["fused_impl"].startswith("torch")
    for path in bench.PATHS:  # the CPU paths agree with float64 to fp32 rounding
        assert max(result["check_vs_float64"][path].values()) < 1e-4, path
    tokens = result["shapes"]["tokens"]
    assert {(r["tokens"], r["path"]) for r in result["rows"]} == {
        (n, p) for n in tokens for p in (*bench.PATHS, "matmuls")
    }
    for r in result["rows"]:
        assert r["ms_median"] > 0 and len(r["ms_all"]) == result["iters"]
        assert (r["peak_extra_bytes"] is None) == (r["path"] == "matmuls")
    for n in tokens:
        rat = result["ratios"][str(n)]
        # the chunked path never holds [N, V]: less memory than naive even at toy sizes
        assert rat["chunked"]["memory_vs_naive"] < 1
        agree = result["agreement"][str(n)]["chunked_vs_naive"]
        assert agree["logp_abs"] < 1e-4 and agree["grad_weight_rel"] < 1e-4
    printed = capsys.readouterr().out
    assert "| tokens | path |" in printed and f"wrote {out}" in printed


def test_without_cuda_and_without_smoke_refuses(capsys) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit):
        _bench().parse([])
    assert "--smoke" in capsys.readouterr().err
