"""What checkpoint integrity and finite-update guarding cost, on the CPU.

    .venv/bin/python benchmarks/checkpoint_integrity.py          # writes benchmarks/results/
    .venv/bin/python benchmarks/checkpoint_integrity.py --smoke --out /tmp/x.json

One process, a megatron-core policy (Qwen3-MoE, fp32, Adam) from `megarl.megatron.policy`:
- digest throughput of xxh3-128 (what megarl uses) against sha256, blake2b and crc32;
- save: megatron's own write (`Policy.save`) against megarl's manifest pass (read back, hash,
  fsync every file and folder: `write_manifest`), and the hash alone without fsync;
- load: megatron's load (`Policy.load`) against the verification that precedes it
  (`verify_checkpoint`). Both read a checkpoint the page cache holds (the machine's memory is
  larger than it): cold reads from a parallel filesystem cost both the same extra read;
- one optimizer update through `Policy.train` (with `UpdateGuard`: host snapshot, finiteness
  pass, one micro-batch forward) against the same update through `train_step` alone.
Prints a table last; exit 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_common_args, environment, finish, markdown_table  # noqa: E402

MODEL = {  # ~70 M parameters: an ~0.8 GB checkpoint with Adam's moments
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 8192,
    "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SMOKE_MODEL = MODEL | {"vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
                       "num_experts": 4, "intermediate_size": 256, "moe_intermediate_size": 64,
                       "num_attention_heads": 2, "num_key_value_heads": 1}


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def digest_throughput(megabytes: int) -> dict[str, float]:
    import xxhash

    data = os.urandom(megabytes << 20)
    fns = {"xxh3_128": lambda: xxhash.xxh3_128_digest(data),
           "sha256": lambda: hashlib.sha256(data).digest(),
           "blake2b": lambda: hashlib.blake2b(data).digest(),
           "crc32": lambda: zlib.crc32(data)}
    return {name: megabytes / 1024 / _median_s(fn, 3) for name, fn in fns.items()}


def build_policy(hf_config: dict[str, Any]) -> Any:
    from megarl.config import Config, read_yaml
    from megarl.megatron.policy import Policy

    data = read_yaml("examples/configs/quickstart.yaml")
    data["model"]["hf_config"] = dict(hf_config)
    data["trainer"] |= {"micro_batch_size": 8, "mini_batch_size": 32}
    data["model"]["routing_replay"] = "off"  # random tokens, no engine routes
    config = Config.from_dict(data)
    return config, Policy(config, hf_config)


def samples(count: int, length: int, vocab: int) -> list[Any]:
    import torch

    from megarl.policy_io import TrainSample

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(2, vocab, (length,), generator=g)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 4:] = True
        out.append(TrainSample(tokens=tokens, loss_mask=mask,
                               advantages=torch.randn((), generator=g),
                               old_logprobs=torch.full((length,), -7.0)))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megarl.megatron.step import train_step
    from megarl.run_checkpoints import file_digest, verify_checkpoint, write_manifest

    hf_config = SMOKE_MODEL if args.smoke else MODEL
    config, policy = build_policy(hf_config)
    spec = config.algo.objective(norm_length=64)
    batch = samples(32, 64, hf_config["vocab_size"])
    # the first update creates Adam's state; the checkpoint then holds it
    policy.train(batch, spec, 1e-4)
    record: dict[str, Any] = {"model": hf_config, "repeats": args.repeats}
    record["digest_gb_per_s"] = digest_throughput(64 if args.smoke else 512)
    root = Path(tempfile.mkdtemp(prefix="megarl-ckpt-bench-", dir=args.dir))
    try:
        saves, manifests, hashes, loads, verifies = [], [], [], [], []
        for i in range(args.repeats):
            ckpt = root / f"step_{i}"
            ckpt.mkdir()
            start = time.perf_counter()
            policy.save(ckpt / "policy")
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_manifest(ckpt, i)
            manifests.append(time.perf_counter() - start)
            files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE"]
            start = time.perf_counter()
            for path in files:
                file_digest(path)
            hashes.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verify_checkpoint(ckpt) is None
            verifies.append(time.perf_counter() - start)
            start = time.perf_counter()
            policy.load(ckpt / "policy")
            loads.append(time.perf_counter() - start)
            record["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
            shutil.rmtree(ckpt)
        med = statistics.median
        record |= {"save_s": med(saves), "manifest_s": med(manifests), "hash_only_s": med(hashes),
                   "load_s": med(loads), "verify_s": med(verifies)}
        guarded = _median_s(lambda: policy.train(batch, spec, 1e-4), args.repeats)
        mbs = policy.micro_batches(policy.local_share(batch))
        plain = _median_s(lambda: train_step(policy.models, policy.optimizer, mbs, spec,
                                             policy.options, replay=policy.replayer),
                          args.repeats)
        record |= {"update_guarded_s": guarded, "update_plain_s": plain}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    record["environment"] = environment()
    return record


def table(record: dict[str, Any]) -> str:
    gb = record["checkpoint_bytes"] / 1e9
    d = record["digest_gb_per_s"]
    rows = [
        ["digest GB/s (1 core)", " / ".join(f"{k} {v:.2f}" for k, v in d.items()), ""],
        [f"save {gb:.2f} GB: megatron write", f"{record['save_s']:.2f} s", ""],
        ["save: + manifest (hash, fsync)", f"{record['manifest_s']:.2f} s",
         f"{100 * record['manifest_s'] / record['save_s']:.0f} % of the write"],
        ["  of which hashing (page cache)", f"{record['hash_only_s']:.2f} s",
         f"fsync {max(0.0, record['manifest_s'] - record['hash_only_s']):.2f} s"],
        ["load: megatron load", f"{record['load_s']:.2f} s", ""],
        ["load: + verification first", f"{record['verify_s']:.2f} s",
         f"{100 * record['verify_s'] / record['load_s']:.0f} % of the load"],
        ["one update, train_step", f"{record['update_plain_s']:.3f} s", ""],
        ["one update, guarded (Policy.train)", f"{record['update_guarded_s']:.3f} s",
         f"+{100 * (record['update_guarded_s'] / record['update_plain_s'] - 1):.0f} %"],
    ]
    return ("Checkpoint integrity and the update guard, CPU "
            f"({record['environment']['cpu_count']} cores)\n\n"
            + markdown_table(rows, ["what", "time", "relative"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "a tiny model, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    return finish("checkpoint_integrity", args, run, table, lambda record: True,
                  smoke={"repeats": 1}, full={"repeats": 3})


if __name__ == "__main__":
    sys.exit(main())
