"""Chunked vocab-parallel log-probs / entropy (megarl/megatron/logprobs.py) against a float64
full-vocabulary ``log_softmax`` reference: values and gradients, chunk sizes, two gloo TP ranks,
and the memory claim (nothing ``[N, V]`` is saved for backward; the forward+backward peak grows
with the chunk size, not with tokens x vocab)."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from benchmarks._common import live_bytes
from megarl.megatron.logprobs import (
    LogProbContext,
    logprob_entropy_output_processor,
    vocab_parallel_logprobs,
)

# ---------------------------------------------------------------------------------------------
# data and float64 reference


def make_case(n: int, vocab: int, hidden: int, temperature: float, seed: int = 0):
    """Integer-valued hidden states and weights in multiples of 1/16, so ``h @ W^T`` is exact in
    fp32 and the comparison measures the softmax algorithm, not matmul rounding. Logits reach
    |z| ~ 50 (std ~ 17 / T); a third of the labels are the argmax (log p ~ 0, peaked entropy),
    the rest uniform (log p down to ~ -100)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-8, 9, (n, hidden), generator=g).float()
    w = torch.randint(-8, 9, (vocab, hidden), generator=g).float() / 16
    labels = torch.randint(0, vocab, (n,), generator=g)
    top = (h @ w.t()).argmax(-1)
    labels[: n // 3] = top[: n // 3]
    # Random upstream weights for both outputs: loss = sum(a * logp + b * H).
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return h, w, labels, a, b


def reference(h: Tensor, w: Tensor, labels: Tensor, a: Tensor, b: Tensor, temperature: float):
    """float64 full-vocabulary (logp, H, dL/dh, dL/dW) for L = sum(a logp + b H)."""
    h64 = h.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    log_p = torch.log_softmax((h64 @ w64.t()) / temperature, dim=-1)
    logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    (a * logp + b * ent).sum().backward()
    return logp.detach(), ent.detach(), h64.grad, w64.grad


def ours(h, w, labels, a, b, temperature, chunk_size, with_entropy=True, **kw):
    hl = h.clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(
        hl, wl, labels, temperature=temperature, chunk_size=chunk_size,
        with_entropy=with_entropy, **kw,
    )  # fmt: skip
    loss = (a.to(logp.dtype) * logp).sum()
    if ent is not None:
        loss = loss + (b.to(ent.dtype) * ent).sum()
    loss.backward()
    return logp.detach(), (None if ent is None else ent.detach()), hl.grad, wl.grad


def assert_values(x: Tensor, ref: Tensor) -> None:
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-6)


def assert_grads(x: Tensor, ref: Tensor) -> None:
    """Gradients are sums over V of p-weighted terms: fp32 summation error scales with the
    gradient's magnitude, so the absolute tolerance is 1e-6 of the largest entry (plain fp32
    ``torch.log_softmax`` lands at the same error)."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------------------------------------
# single process


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.7])
def test_matches_float64_full_vocab_reference(temperature):
    h, w, labels, a, b = make_case(n=96, vocab=384, hidden=32, temperature=temperature)
    ref_lp, ref_h, ref_gh, ref_gw = reference(h, w, labels, a, b, temperature)
    assert ref_h.min() < 1e-4 and (-ref_lp).max() > 30  # peaked and very unlikely tokens
    logp, ent, gh, gw = ours(h, w, labels, a, b, temperature, chunk_size=7)
    assert logp.dtype == ent.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.float32
    assert_values(logp, ref_lp)
    assert_values(ent, ref_h)
    assert_grads(gh, ref_gh)
    assert_grads(gw, ref_gw)


def test_chunk_sizes_agree_and_entropy_off_keeps_logp():
    n, t = 50, 0.7
    h, w, labels, a, b = make_case(n=n, vocab=256, hidden=16, temperature=t, seed=1)
    base = ours(h, w, labels, a, b, t, chunk_size=n)
    for c in (1, 7, n + 13):  # 7 does not divide 50; n + 13 > N is one chunk
        got = ours(h, w, labels, a, b, t, chunk_size=c)
        for x, y in zip(got, base, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)

    # with_entropy=False: same log-probs, and the gradients of sum(a * logp) alone.
    ref_lp, _, ref_gh, ref_gw = reference(h, w, labels, a, torch.zeros_like(b), t)
    logp, ent, gh, gw = ours(h, w, labels, a, b, t, chunk_size=7, with_entropy=False)
    assert ent is None
    torch.testing.assert_close(logp, base[0], rtol=0, atol=0)
    assert_grads(gh, ref_gh)
    assert_grads(gw, ref_gw)


def test_leading_dims_and_one_output_used():
    h, w, labels, a, b = make_case(n=24, vocab=64, hidden=8, temperature=1.0, seed=2)
    ref_lp, ref_h, ref_gh, _ = reference(h, w, labels, torch.zeros_like(a), b, 1.0)
    hl = h.view(4, 6, 8).clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(hl, w, labels.view(4, 6), chunk_size=5)
    assert logp.shape == ent.shape == (4, 6)
    assert_values(logp.reshape(-1), ref_lp)
    # Only the entropy reaches the loss: log p's gradient arrives as None and is skipped.
    (b.float().view(4, 6) * ent).sum().backward()
    assert_grads(hl.grad.reshape(24, 8), ref_gh)


def test_bfloat16_inputs_keep_dtypes():
    h, w, labels, a, b = make_case(n=40, vocab=128, hidden=16, temperature=1.0, seed=3)
    # Small integers times 1/16 are exact in bf16 too; the products are rounded to bf16 once.
    _, _, ref_gh, ref_gw = reference(h, w, labels, a, b, 1.0)
    logp, ent, gh, gw = ours(h.bfloat16(), w.bfloat16(), labels, a, b, 1.0, chunk_size=16)
    assert logp.dtype == ent.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.bfloat16
    for x, r in ((gh, ref_gh), (gw, ref_gw)):
        torch.testing.assert_close(x.double(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(2, 3)}, "labels"),
        ({"weight": torch.randn(8, 3)}, "weight"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {"hidden": torch.randn(2, 3, 4), "weight": torch.randn(8, 4)}
    args["labels"] = torch.zeros(2, 3, dtype=torch.long)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        vocab_parallel_logprobs(**args)
    assert "\n" not in str(info.value)


def test_output_processor_single_rank():
    """[s, b, h] hidden states and [b, s] labels in, fp32 [b, s, 2] out, in the right token
    order; the shared embedding weight wins over output_layer.weight; MuP's logit multiplier is
    folded into the temperature. Single rank: no megatron parallel state is needed."""
    s, bsz, hd, vocab, t = 5, 3, 8, 32, 0.7
    h, w, labels, _, _ = make_case(n=s * bsz, vocab=vocab, hidden=hd, temperature=t, seed=4)
    hidden_states = h.view(s, bsz, hd)
    labels_bs = labels.view(bsz, s)
    ref = torch.log_softmax((hidden_states.double() @ w.double().t()) / t, dim=-1)  # [s, b, V]
    ref_lp = ref.gather(-1, labels_bs.t().unsqueeze(-1)).squeeze(-1).t()  # [b, s]
    ref_h = (-(ref.exp() * ref).sum(-1)).t()
    layer = SimpleNamespace(weight=torch.zeros_like(w), bias=None, tp_group=None)
    config = SimpleNamespace(sequence_parallel=False, use_mup=True, mup_output_mult=2.0)
    out = logprob_entropy_output_processor(
        hidden_states=hidden_states,
        output_layer=layer,
        output_weight=w / 2,  # (w/2) * mup 2.0 = w
        labels=labels_bs,
        context=LogProbContext(temperature=t, chunk_size=4),
        config=config,
        loss_mask=None,  # extra keyword arguments megatron passes are accepted
    )
    assert out.shape == (bsz, s, 2) and out.dtype == torch.float32
    assert_values(out[..., 0], ref_lp)
    assert_values(out[..., 1], ref_h)
    out = logprob_entropy_output_processor(
        hidden_states=hidden_states,
        output_layer=SimpleNamespace(weight=w, bias=None, tp_group=None),
        output_weight=None,
        labels=labels_bs,
        context=LogProbContext(temperature=t, with_entropy=False),
        config=SimpleNamespace(sequence_parallel=False, use_mup=False),
    )
    assert_values(out[..., 0], ref_lp)
    assert torch.equal(out[..., 1], torch.zeros(bsz, s))


# ---------------------------------------------------------------------------------------------
# two tensor-parallel ranks (gloo)

TP_N, TP_V, TP_H, TP_T, TP_CHUNK = 23, 64, 16, 0.7, 5


def _tp_case():
    h, w, labels, a, b = make_case(n=TP_N, vocab=TP_V, hidden=TP_H, temperature=TP_T, seed=5)
    labels[::2] = labels[::2] % (TP_V // 2)  # both shards own labels
    labels[1::4] = TP_V // 2 + labels[1::4] % (TP_V // 2)
    return h, w, labels, a, b


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        h, w, labels, a, b = _tp_case()
        shard = w.chunk(2, dim=0)[rank]  # rows [rank V/2, (rank + 1) V/2)
        got = ours(
            h, shard, labels, a, b, TP_T, chunk_size=TP_CHUNK, tp_group=dist.group.WORLD
        )  # vocab_start defaults to rank * V/2
        torch.save(got, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_tensor_parallel_ranks_match_full_vocab(tmp_path):
    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    h, w, labels, a, b = _tp_case()
    assert (labels < TP_V // 2).any() and (labels >= TP_V // 2).any()
    ref_lp, ref_h, ref_gh, ref_gw = reference(h, w, labels, a, b, TP_T)
    for logp, ent, _, _ in (r0, r1):  # every rank holds the full-vocabulary values
        assert_values(logp, ref_lp)
        assert_values(ent, ref_h)
    assert_grads(r0[2] + r1[2], ref_gh)  # partial hidden grads: megatron sums them over TP
    assert_grads(torch.cat([r0[3], r1[3]]), ref_gw)


# ---------------------------------------------------------------------------------------------
# memory: CPU has no max_memory_allocated; live_bytes() (benchmarks/_common.py, the logprobs
# benchmark's CPU measure too) tracks the peak bytes of tensor storages created inside it and
# still alive, at aten op boundaries

MEM_V, MEM_H = 8192, 32


def _mem_inputs(n: int):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(n, MEM_H, generator=g).requires_grad_(True)
    w = (torch.randn(MEM_V, MEM_H, generator=g) / MEM_H**0.5).requires_grad_(True)
    labels = torch.randint(0, MEM_V, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return h, w, labels, a, b


def peak_bytes(n: int, chunk_size: int | None) -> int:
    """Extra peak bytes of forward + backward of sum(a logp + b H); chunk_size None is the naive
    full-logits version (the control that shows the tracker sees [N, V] tensors)."""
    h, w, labels, a, b = _mem_inputs(n)
    with live_bytes() as tracker:
        if chunk_size is None:
            log_p = torch.log_softmax(h @ w.t(), dim=-1)
            logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            ent = -(log_p.exp() * log_p).sum(-1)
        else:
            logp, ent = vocab_parallel_logprobs(h, w, labels, chunk_size=chunk_size)
        ((a * logp).sum() + (b * ent).sum()).backward()
    return tracker.peak


def test_nothing_token_by_vocab_is_saved_for_backward():
    n = 4096
    h, w, labels, _, _ = _mem_inputs(n)
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        saved[StorageWeakRef(st).cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs(h, w, labels, chunk_size=256)
    inputs = h.nbytes + w.nbytes + labels.nbytes  # saved by reference, not copied
    logits = n * MEM_V * 4
    assert max(saved.values()) < logits / 100
    assert inputs <= sum(saved.values()) <= inputs + 4 * n * 4  # + a few fp32 per token


def test_peak_memory_grows_with_chunk_not_tokens_times_vocab():
    n, row = 4096, MEM_V * 4  # one fp32 logit row
    p32, p256 = peak_bytes(n, 32), peak_bytes(n, 256)
    p32_half = peak_bytes(n // 2, 32)
    naive = peak_bytes(1024, None)
    print(f"peak extra bytes: c=32 {p32}, c=256 {p256}, N/2 c=32 {p32_half}, naive N=1024 {naive}")
    assert naive >= 1024 * row  # the tracker sees an [N, V] tensor when there is one
    assert p32 < 0.1 * n * row
    # Linear in the chunk: a few fp32 [c, V] buffers alive at once.
    k = (p256 - p32) / ((256 - 32) * row)
    assert 1.0 <= k <= 6.0, k
    # Per extra token: O(H) bytes (hidden grad, per-token stats), not O(V).
    per_token = (p32 - p32_half) / (n - n // 2)
    assert 0 <= per_token < 0.05 * row, per_token
