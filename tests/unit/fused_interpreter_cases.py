"""Runs the Triton log-prob kernels under Triton's CPU interpreter and saves what they return.

    TRITON_INTERPRET=1 python -m tests.unit.fused_interpreter_cases OUT_DIR

`TRITON_INTERPRET` must be set before triton decorates the kernels (at import), so
tests/unit/test_fused_logprobs.py runs this module in a subprocess and compares the saved
tensors with the float64 reference there. Each case is `CASES[name]`; results go to
``OUT_DIR/<name>.pt``. The two-rank case runs both ranks over gloo, each with the kernels on its
vocab shard.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

if __name__ == "__main__":  # run as a script: before triton imports (importers are unaffected)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megarl.megatron import fused_logprobs  # noqa: E402
from megarl.megatron.logprobs import _kernel_targets  # noqa: E402
from tests.unit.test_vocab_parallel_logprobs import _free_port, make_case, ours  # noqa: E402

# n, vocab, hidden: 37 tokens and 40 columns are not multiples of the 16-wide interpreter tiles;
# hidden 24 is not a multiple of BLOCK_K (masked K loop), 32 is. chunk_size sets the backward
# scratch: 1024 -> one vocab chunk, 5 -> 16-column chunks (16 + 16 + 8).
CASES = {
    "fp32_t1_one_chunk": dict(n=37, vocab=40, hidden=24, temperature=1.0, chunk_size=1024),
    "fp32_t07_three_chunks": dict(n=37, vocab=40, hidden=32, temperature=0.7, chunk_size=5),
    "fp32_t05_no_entropy": dict(n=21, vocab=48, hidden=16, temperature=0.5, chunk_size=5,
                                with_entropy=False),
    "fp32_entropy_only": dict(n=21, vocab=48, hidden=16, temperature=0.7, chunk_size=5,
                              logp_weight=0.0),
    "bf16_t07": dict(n=37, vocab=40, hidden=32, temperature=0.7, chunk_size=5,
                     dtype=torch.bfloat16),
    # hidden states a column slice of a wider tensor (row stride 40, not 24)
    "fp32_strided_hidden": dict(n=19, vocab=40, hidden=24, temperature=0.7, chunk_size=5,
                                strided=True),
}  # fmt: skip
SEEDS = {name: 10 + i for i, name in enumerate(CASES)}

TP = dict(n=29, vocab=64, hidden=24, temperature=0.7, chunk_size=4, seed=31)


def case_data(name: str):
    c = CASES[name]
    h, w, labels, a, b = make_case(c["n"], c["vocab"], c["hidden"], c["temperature"], SEEDS[name])
    a = a * c.get("logp_weight", 1.0)
    return h, w, labels, a, b


def tp_data():
    h, w, labels, a, b = make_case(TP["n"], TP["vocab"], TP["hidden"], TP["temperature"],
                                   TP["seed"])  # fmt: skip
    half = TP["vocab"] // 2
    labels[::2] = labels[::2] % half  # rank 0 owns these, rank 1 does not
    labels[1::4] = half + labels[1::4] % half  # and the other way round
    return h, w, labels, a, b


def run_case(name: str, out_dir: Path) -> None:
    c = CASES[name]
    h, w, labels, a, b = case_data(name)
    dtype = c.get("dtype", torch.float32)
    with_entropy = c.get("with_entropy", True)
    if c.get("strided"):
        wide = torch.zeros(c["n"], c["hidden"] + 16, dtype=dtype)
        wide[:, : c["hidden"]] = h
        wide.requires_grad_(True)
        wl = w.to(dtype).requires_grad_(True)
        view = wide[:, : c["hidden"]]
        assert not view.is_contiguous()
        logp, ent = fused_call(view, wl, labels, c)
        ((a.float() * logp).sum() + (b.float() * ent).sum()).backward()
        got = (logp.detach(), ent.detach(), wide.grad[:, : c["hidden"]], wl.grad)
    elif c.get("logp_weight", 1.0) == 0.0:  # the loss uses only the entropy: g_logp is None
        hl = h.to(dtype).requires_grad_(True)
        wl = w.to(dtype).requires_grad_(True)
        logp, ent = fused_call(hl, wl, labels, c)
        (b.to(torch.float32) * ent).sum().backward()
        got = (logp.detach(), ent.detach(), hl.grad, wl.grad)
    else:
        got = ours(h.to(dtype), w.to(dtype), labels, a, b, c["temperature"], c["chunk_size"],
                   with_entropy=with_entropy, impl="triton")  # fmt: skip
    torch.save(got, out_dir / f"{name}.pt")


def fused_call(h, w, labels, c):
    from megarl.megatron.logprobs import vocab_parallel_logprobs

    return vocab_parallel_logprobs(h, w, labels, temperature=c["temperature"],
                                   chunk_size=c["chunk_size"], impl="triton")  # fmt: skip


def shard_partials(out_dir: Path) -> None:
    """The forward kernel alone on each half of the vocabulary (rank r of 2): its raw
    ``[4, n_splits, N]`` partials, labels outside the shard marked -1."""
    h, w, labels, _, _ = tp_data()
    half = TP["vocab"] // 2
    parts = []
    for rank in range(2):
        shard = w[rank * half : (rank + 1) * half]
        targets = _kernel_targets(labels, rank * half, half)
        parts.append(fused_logprobs.local_partials(h, shard, targets, TP["temperature"], True))
    torch.save(parts, out_dir / "shard_partials.pt")


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))  # fmt: skip
    try:
        h, w, labels, a, b = tp_data()
        shard = w.chunk(2, dim=0)[rank]
        got = ours(h, shard, labels, a, b, TP["temperature"], TP["chunk_size"],
                   tp_group=dist.group.WORLD, impl="triton")  # fmt: skip
        torch.save(got, Path(out_dir) / f"tp_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(out_dir: str) -> None:
    assert fused_logprobs.interpreting(), "TRITON_INTERPRET=1 must be set before triton imports"
    torch.set_num_threads(1)
    out = Path(out_dir)
    for name in CASES:
        run_case(name, out)
    shard_partials(out)
    mp.spawn(_tp_worker, args=(_free_port(), out_dir), nprocs=2, join=True)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
