"""Every megatron layout equals the single-rank run, and HF <-> Megatron conversion is exact in
every layout (tests/distributed/layouts.py).

Four launches: the single-rank reference (which also checks 1 / 2 / 4 micro-batches and the
non-finite skip), then one torchrun per world size (2, 4, 8) looping over its layouts. Around
them, single-process runs of the offline converters: HF -> distributed checkpoint -> HF before,
and each launch's saved distributed checkpoints -> HF after. Each
layout x loss prints a CASE line; a case that did not run fails here as surely as one that
failed there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("layouts.py")
CASES = Path(__file__).with_name("conversion_cases.py")
MODELS = ("qwen3_moe", "qwen3", "qwen2", "llama")
LOSSES = ("dapo-token-mean", "grpo-seq-mean", "gspo", "up_gspo")
LAUNCHES = {
    2: ("tp2", "pp2", "pp2vpp2", "ep2", "dp2", "cp2loss", "ep2seq"),
    4: ("tp2ep2", "tp2pp2", "pp2ep2"),
    8: ("tp2pp2ep2",),
}
# HF <-> Megatron conversion (tests/distributed/conversion_cases.py), in the same launches;
# consecutive cases of one model also check Megatron(previous layout) -> HF -> Megatron(this).
CONVERSIONS = {
    1: ("convert-qwen3_moe-1", "convert-qwen3-1", "convert-qwen2-1", "convert-llama-1"),
    2: ("convert-qwen3_moe-tp2", "convert-qwen3_moe-pp2", "convert-qwen3_moe-ep2",
        "convert-qwen3-tp2", "convert-qwen3-pp2", "convert-qwen2-tp2", "convert-llama-tp2",
        "convert-llama-pp2"),
    4: ("convert-qwen3_moe-tp2", "convert-qwen3_moe-tp2ep2", "convert-qwen3-pp2",
        "convert-qwen3-tp2pp2", "convert-llama-tp2pp2"),
    8: ("convert-qwen3_moe-tp2pp2ep2",),
}
# Rollout routing replay (tests/distributed/replay_cases.py): the transformers engine's routes
# replayed in Megatron; TP2 is with sequence parallelism.
REPLAYS = {1: ("replay-1",), 2: ("replay-tp2", "replay-pp2", "replay-ep2"), 4: (),
           8: ("replay-tp2pp2ep2",)}


def _run(args: list[str], hf_root: Path, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MEGARL_TEST_HF_ROOT": str(hf_root),
           "MEGARL_DUMP_AFTER": str(timeout - 60)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    return output


def _assert_cases(output: str, layouts: tuple[str, ...], losses: tuple[str, ...]) -> None:
    lines = [line for line in output.splitlines() if line.startswith("CASE ")]
    for layout in layouts:
        for loss in losses:
            hits = [line for line in lines if line.split()[1:3] == [layout, loss]]
            assert hits, f"case {layout} {loss} did not run:\n" + "\n".join(lines)
            assert all(line.split()[3] == "PASS" for line in hits), "\n".join(hits)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Tiny transformers checkpoints (Qwen3-MoE: 8 experts top-2, GQA 4:1, qk-norm; Qwen3
    dense with tied embeddings; Qwen2 with q/k/v biases; Llama), each converted offline to a
    megatron distributed checkpoint ``dist-<model>`` and back to HF."""
    from tests.distributed.conversion_cases import write_tiny_checkpoints

    root = tmp_path_factory.mktemp("hf")
    write_tiny_checkpoints(root)
    return root, _run([sys.executable, str(CASES), "offline", str(root)], root)


@pytest.fixture(scope="module")
def hf_root(offline: tuple[Path, str]) -> Path:
    return offline[0]


def test_offline_round_trip_is_bit_identical_and_loads_in_transformers(
    offline: tuple[Path, str],
) -> None:
    _assert_cases(offline[1], tuple(f"offline-{m}" for m in MODELS), ("hf",))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, hf_root: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("megatron") / "reference.pt"
    output = _run([sys.executable, str(SCRIPT), "reference", str(out), *CONVERSIONS[1],
                   *REPLAYS[1]], hf_root)
    return out, output


def test_micro_batch_split_invariance_and_nonfinite_skip(reference: tuple[Path, str]) -> None:
    _, output = reference
    _assert_cases(output, ("microbatches2", "microbatches4"), LOSSES)
    _assert_cases(output, ("nonfinite-skip",), ("gspo",))


def _assert_saved_export_to_source(conversions: tuple[str, ...], hf_root: Path) -> None:
    """The distributed checkpoints the launch saved from its layouts, converted offline to HF,
    are bit-identical to the source checkpoints."""
    saved = tuple(dict.fromkeys(c.replace("convert-", "saved-", 1) for c in conversions))
    output = _run([sys.executable, str(CASES), "saved", str(hf_root), *saved], hf_root)
    _assert_cases(output, saved, ("hf",))


def test_hf_conversion_on_one_rank(reference: tuple[Path, str], hf_root: Path) -> None:
    _, output = reference
    _assert_cases(output, CONVERSIONS[1], ("hf",))
    _assert_saved_export_to_source(CONVERSIONS[1], hf_root)
    _assert_cases(output, REPLAYS[1], ("r3",))


@pytest.mark.parametrize("world_size", sorted(LAUNCHES))
def test_layouts_equal_single_rank_and_hf(
    reference: tuple[Path, str], hf_root: Path, world_size: int
) -> None:
    ref_path, _ = reference
    layouts, conversions = LAUNCHES[world_size], CONVERSIONS[world_size]
    output = _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world_size}", str(SCRIPT), "compare", str(ref_path), *layouts,
        *conversions, *REPLAYS[world_size],
    ], hf_root)  # fmt: skip
    _assert_cases(output, layouts, LOSSES)
    _assert_cases(output, conversions, ("hf",))
    _assert_saved_export_to_source(conversions, hf_root)
    _assert_cases(output, REPLAYS[world_size], ("r3",))
