"""`megarl plan` accepts exactly the layouts megatron-core itself accepts.

Each layout goes through `megarl plan` (config validation and the planner, in-process) and
through megatron-core's own `TransformerConfig`, `initialize_model_parallel` in a fake world of
that size, vocabulary split and GPT model build (`layout_agreement_cases.py`, one subprocess for
all cases). A rule missing from megarl's one layout check (`ParallelConfig.check_model`) makes
plan accept a layout megatron refuses, and this test fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "configs" / "quickstart.yaml")
MOE = {"vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
       "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
       "max_position_embeddings": 128}

KV_SPLIT = ("megarl's: the weight map, HF conversion and weight sync split whole KV heads "
            "over TP (megatron-core 0.19 would replicate them)")
MOE_SP = "megarl's: MoE layers with TP train with sequence parallelism (as Megatron-LM requires)"

# (model changes, layout, world size, the megarl rule that refuses it where megatron's
# construction would not)
CASES = [
    ({}, {}, 1, None),
    ({}, {"tp": 2}, 2, None),
    ({}, {"tp": 2, "sequence_parallel": False}, 2, MOE_SP),
    ({}, {"tp": 4}, 4, KV_SPLIT),  # 2 KV heads
    ({"num_key_value_heads": 4}, {"tp": 4}, 4, None),
    ({}, {"tp": 3}, 3, None),  # 4 heads
    ({}, {"tp": 2}, 3, None),  # world not a multiple of tp
    ({"vocab_size": 33}, {"tp": 2}, 2, None),  # vocabulary split over TP
    ({}, {"pp": 2}, 2, None),
    ({}, {"pp": 3}, 3, None),  # 4 layers
    ({}, {"pp": 2, "vpp": 2}, 2, None),
    ({}, {"pp": 2, "vpp": 4}, 2, None),  # 8 stages for 4 layers
    ({}, {"ep": 2}, 2, None),
    ({}, {"ep": 4}, 4, None),
    ({}, {"ep": 3}, 3, None),  # 4 experts
    ({}, {"ep": 4}, 2, None),  # experts over more ranks than the world
    ({}, {"tp": 2, "ep": 2, "etp": 1}, 4, None),
    ({}, {"tp": 2, "ep": 2, "etp": 2}, 4, None),
    ({}, {"tp": 2, "pp": 2, "ep": 2}, 8, None),
    ({}, {"tp": 2, "ep": 4}, 2, None),
]


def plan_accepts(model: dict, layout: dict, world: int, capsys: pytest.CaptureFixture) -> bool:
    overrides = [f"model.hf_config.{k}={v}" for k, v in model.items()]
    overrides += [f"parallel.{k}={str(v).lower()}" for k, v in layout.items()]
    overrides += [f"parallel.world_size={world}", "rollout.tp=1"]
    status = main(["plan", QUICKSTART, *overrides])
    out = capsys.readouterr()
    assert status in (0, 2), out.err
    return status == 0


def test_plan_and_megatron_accept_and_refuse_the_same_layouts(
        capsys: pytest.CaptureFixture) -> None:
    planned = [plan_accepts(MOE | m, layout, w, capsys) for m, layout, w, _ in CASES]
    cases = [[MOE | m, layout, w] for m, layout, w, _ in CASES]
    r = subprocess.run([sys.executable, str(Path(__file__).with_name(
        "layout_agreement_cases.py"))], input=json.dumps(cases), capture_output=True,
        text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    megatron = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(megatron) == len(CASES)
    for case, plan_ok, verdict in zip(CASES, planned, megatron, strict=True):
        megarl_rule = case[3]
        if megarl_rule is not None:  # megatron builds it; megarl refuses it, on purpose
            assert verdict["ok"] and not plan_ok, (case, plan_ok, verdict)
        else:
            assert plan_ok == verdict["ok"], (case, plan_ok, verdict["why"])
    assert 0 < sum(planned) < len(CASES)  # both verdicts occur
