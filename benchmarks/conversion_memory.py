"""Peak memory of checkpoint conversion against the number of layers.

For synthetic Qwen3-MoE checkpoints that differ only in depth, run each converter in a fresh
process and record the peak of its ANONYMOUS resident memory (RssAnon, sampled every
millisecond) above the level just before conversion starts. File-backed pages (the
memory-mapped safetensors being read) are page cache the kernel can drop, not memory the
converter holds, so they are left out; VmHWM (which counts them) is recorded next to it.
glibc is told to return every large free block (MALLOC_MMAP_THRESHOLD_), so freed tensors show.

    python benchmarks/conversion_memory.py [--layers 4 16 32] [--hidden 1024] [--experts 16]

Writes benchmarks/results/conversion_memory.json and prints a table. A streaming converter
shows the same peak at every depth: about one layer (plus one HF shard bucket when writing HF).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "conversion_memory.json"


def tiny_moe_config(layers: int, hidden: int, experts: int, moe_ffn: int) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "moe_intermediate_size": moe_ffn, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": hidden // 16,
        "num_experts": experts, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "hidden_act": "silu", "dtype": "bfloat16",
    }  # fmt: skip


def layer_bytes(config: dict, bytes_per_param: int = 2) -> int:
    """The bytes of one decoder layer's tensors."""
    from megarl.convert.mapping import Architecture, tensor_maps

    arch = Architecture.from_hf(config)
    total = 0
    for tm in tensor_maps(arch):
        if tm.layer == 0:
            n = 1
            for d in tm.shape:
                n *= d
            total += n
    return total * bytes_per_param


def make_checkpoint(path: Path, config: dict) -> None:
    """Random bf16 weights written one layer per shard (never more than a layer in memory)."""
    import torch

    from megarl.convert.hf_io import HFCheckpointWriter
    from megarl.convert.mapping import Architecture, tensor_maps

    arch = Architecture.from_hf(config)
    g = torch.Generator().manual_seed(0)
    with HFCheckpointWriter(path, config, max_shard_bytes=layer_bytes(config)) as writer:
        for tm in tensor_maps(arch):
            full = torch.randn(tm.shape, generator=g).to(torch.bfloat16) * 0.02
            for name, tensor in zip(tm.hf, tm.to_hf(full, arch), strict=True):
                writer.add(name, tensor.clone())


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(direction: str, source: str, out: str, shard_bytes: int) -> dict:
    """Run one conversion in this process; peak anonymous memory above the start level."""
    from megarl.megatron import hf_conversion  # import everything before the baseline

    baseline = _status()["RssAnon"]
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status()["RssAnon"])
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if direction == "hf-to-megatron":
        hf_conversion.convert_hf_to_megatron(source, out)
    else:
        hf_conversion.convert_megatron_to_hf(source, out, max_shard_bytes=shard_bytes)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _status()["RssAnon"])
    return {"direction": direction, "peak_anon_above_start": peak[0] - baseline,
            "vm_hwm": _status()["VmHWM"], "seconds": seconds}


def measure_in_fresh_process(direction: str, source: Path, out: Path, shard_bytes: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", direction, str(source), str(out),
         str(shard_bytes)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{direction} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(layers: list[int], hidden: int, experts: int, moe_ffn: int, workdir: Path) -> list[dict]:
    rows = []
    for n in layers:
        config = tiny_moe_config(n, hidden, experts, moe_ffn)
        one_layer = layer_bytes(config)
        hf, mcore, back = workdir / f"hf-{n}", workdir / f"mcore-{n}", workdir / f"back-{n}"
        make_checkpoint(hf, config)
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        for direction, src, dst in (("hf-to-megatron", hf, mcore), ("megatron-to-hf", mcore, back)):
            row = measure_in_fresh_process(direction, src, dst, shard_bytes=one_layer)
            row.update(layers=n, checkpoint_bytes=size, layer_bytes=one_layer,
                       bucket_bytes=one_layer if direction == "megatron-to-hf" else 0)
            rows.append(row)
        for path in (hf, mcore, back):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| direction | layers | checkpoint | one layer | bucket | peak anon above start "
             "| in layers | VmHWM | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    mb = 2**20
    for r in rows:
        lines.append(
            f"| {r['direction']} | {r['layers']} | {r['checkpoint_bytes'] / mb:.0f} MiB | "
            f"{r['layer_bytes'] / mb:.0f} MiB | {r['bucket_bytes'] / mb:.0f} MiB | "
            f"{r['peak_anon_above_start'] / mb:.0f} MiB | "
            f"{r['peak_anon_above_start'] / r['layer_bytes']:.2f} | {r['vm_hwm'] / mb:.0f} MiB | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        direction, source, out, shard = sys.argv[2:6]
        print(json.dumps(measure(direction, source, out, int(shard))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--moe-ffn", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = run(args.layers, args.hidden, args.experts, args.moe_ffn, Path(tmp))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {"what": __doc__.splitlines()[0], "args": vars(args) | {"workdir": None},
              "machine": f"{os.cpu_count()} CPU cores", "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
