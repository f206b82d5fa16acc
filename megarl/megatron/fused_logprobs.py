"""Triton kernels for `megarl.megatron.logprobs`: log-probs and entropy from hidden states and the
output weight, without materialising the logits.

Per token ``n`` with hidden ``h_n`` and this rank's weight shard ``W`` (``[V_local, H]``), the
logits ``z = (h W^T) / T`` are produced tile by tile (``[BLOCK_N, BLOCK_V]`` fp32 accumulators of
``tl.dot`` over ``H``) and consumed in registers:

* forward (`local_partials`): an online softmax across the vocabulary blocks a program visits.
  The vocabulary is cut into ``n_splits`` ranges (so short batches still fill the GPU); each
  (token block, range) program keeps per token the running max ``m``, ``s = sum exp(z - m)``,
  ``S = sum exp(z - m) (z - m)`` and the label's logit ``z_y`` (0 where this shard does not own
  the label). When the max grows from ``m`` to ``m'`` the sums are rescaled with
  ``a = exp(m - m')``::

      s' = a s + sum_tile exp(z - m')
      S' = a (S + s (m - m')) + sum_tile exp(z - m') (z - m')

  The kernel writes these partials ``[4, n_splits, N]``; the caller merges the ranges and the
  tensor-parallel ranks in torch (all-reduce MAX of ``m``, then SUM of ``[s, z_y, S]``).
* backward (`backward`): the vocabulary is cut into chunks of ``width`` columns. For each chunk
  one kernel recomputes the logits tile by tile and writes ``dL/dz`` (scaled by ``1/T``, in the
  weight's dtype) into a bounded ``[N, width]`` scratch::

      dz = (onehot(y) - p) g_logp - p (log p + H) g_H,     log p = (z - m) - log s

  and two cuBLAS matmuls finish the chunk: ``dW[chunk] = dz^T h`` (complete: each vocab row
  lives in one chunk, so it is written once, fp32-accumulated inside the matmul) and
  ``dh += dz W[chunk]`` (fp32 running sum over chunks). Nothing ``[N, V]`` is stored.

On CUDA the tile sizes are autotuned (`_configs`) on first use per (H, V, power-of-two token
bucket, dtypes): the first call compiles and times each configuration (what has been measured
where: benchmarks/README.md).

The matmul operands are the inputs' dtype (bf16 tensor cores on GPU, fp32 accumulation); fp32
inputs use ``input_precision="ieee"`` (no TF32), so fp32 results match a float64 reference to
fp32 rounding. Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs the same kernels;
it multiplies the raw bits of bfloat16 ``tl.dot`` operands (triton-lang/triton#11584), so under
the interpreter bf16 tiles are cast to fp32 before the dot (bf16 products are exact in fp32, so
this matches the GPU's bf16 x bf16 -> fp32 dot up to summation order).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["backward", "interpreting", "local_partials", "scratch_width"]

# Block sizes under the interpreter (CPU, numpy): small, so tests cover partial tiles.
INTERPRET_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_K": 16}
_INTERPRET_SMS = 4  # "SM count" used to pick the number of vocab splits under the interpreter


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, cols, H, stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """fp32 ``h[rows] @ W[cols]^T`` ([BLOCK_N, BLOCK_V]); `rows`/`cols` are in-bounds int64."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < H
            a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, y_ptr, part_ptr,
    N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
    inv_t, n_splits, n_bucket,
    WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """Per (token block, vocab range): partial ``m, s, S, z_y`` of every token, see the module
    docstring. ``n_bucket`` only keys the autotuner."""
    # The split is the fastest grid axis: the programs resident at once cover a few token blocks
    # x all the vocab ranges, so each one's h rows stay in L2 while it sweeps its range, and
    # the programs of one range (same W tiles at about the same time) share W through L2.
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Rows past N repeat in-bounds rows (finite values everywhere); only stores are masked.
    rows_in = (rows % N).to(tl.int64)
    y = tl.load(y_ptr + rows_in)  # local label column, -1: not owned

    n_vb = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_vb, n_splits)
    vb_lo = split * per_split
    vb_hi = tl.minimum(vb_lo + per_split, n_vb)

    # A finite "minus infinity": exp(m - m') is 0 and s (m - m') is 0 * finite, never NaN.
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for vb in range(vb_lo, vb_hi):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols_in = (cols % V).to(tl.int64)
        z = _logits_tile(
            h_ptr, w_ptr, rows_in, cols_in, H, stride_hn, stride_hk, stride_wv, stride_wk,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, IEEE,
        ) * inv_t  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        zc = z - m_new[:, None]  # <= 0; -inf in padding columns
        e = tl.exp(zc)
        alpha = tl.exp(m - m_new)
        if WITH_ENTROPY:  # padding columns: e = 0 times a finite 0, not 0 * -inf
            ent_tile = tl.sum(e * tl.where(col_ok[None, :], zc, 0.0), axis=1)
            ent = alpha * (ent + s * (m - m_new)) + ent_tile
        s = alpha * s + tl.sum(e, axis=1)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new

    out = part_ptr + split * N + rows
    plane = n_splits * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, ent, mask=row_ok)
    tl.store(out + 3 * plane, z_y, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, y_ptr, m_ptr, log_s_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dz_ptr,
    N, V_CHUNK, v0, H, stride_hn, stride_hk, stride_wv, stride_wk, stride_dzn,
    inv_t, n_bucket,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):  # fmt: skip
    """``dL/dz / T`` of columns ``[v0, v0 + V_CHUNK)`` into ``dz[:, :V_CHUNK]`` (dz's dtype)."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(N, BLOCK_N)
    n_vb = tl.cdiv(V_CHUNK, BLOCK_V)
    # Grouped order (as in Triton's matmul tutorial): programs that run together share a few
    # token blocks and a band of vocab blocks, so their h and W tiles are reused from L2.
    per_group = GROUP_N * n_vb
    first = (pid // per_group) * GROUP_N
    group_n = tl.minimum(n_nb - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = (rows % N).to(tl.int64)
    cl = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    col_ok = cl < V_CHUNK
    cols = v0 + cl
    cols_in = (v0 + cl % V_CHUNK).to(tl.int64)
    z = _logits_tile(
        h_ptr, w_ptr, rows_in, cols_in, H, stride_hn, stride_hk, stride_wv, stride_wk,
        BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, IEEE,
    ) * inv_t  # fmt: skip
    # Rows past N repeat in-bounds rows (finite values everywhere); only the store is masked.
    m = tl.load(m_ptr + rows_in)
    log_s = tl.load(log_s_ptr + rows_in)
    log_p = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(log_p)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_G_LOGP:
        g = tl.load(g_logp_ptr + rows_in)
        y = tl.load(y_ptr + rows_in)
        dz = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - p * g[:, None]
    if HAS_G_ENT:
        g_h = tl.load(g_ent_ptr + rows_in)
        ent = tl.load(ent_ptr + rows_in)
        dz -= p * (log_p + ent[:, None]) * g_h[:, None]
    dz = dz * inv_t
    out = dz_ptr + rows_in[:, None] * stride_dzn + cl[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _even_k(args: dict) -> bool:
    return args["H"] % args["BLOCK_K"] == 0


_forward_heuristic = triton.heuristics({"EVEN_K": _even_k})(_forward_kernel)
_dlogits_heuristic = triton.heuristics({"EVEN_K": _even_k})(_dlogits_kernel)


def _configs(group: bool) -> list[triton.Config]:
    """Hopper-sized tiles (tensor-core dots need blocks >= 16; these are the usual GEMM ones)."""
    shapes = [  # BLOCK_N, BLOCK_V, BLOCK_K, warps, stages
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
        (128, 128, 128, 8, 2),
    ]
    out = []
    for bn, bv, bk, warps, stages in shapes:
        kw = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}
        if group:
            kw["GROUP_N"] = 8
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


# Tuned per (H, V, token-count bucket, dtypes): a new micro-batch length in the same power-of-two
# bucket reuses the choice instead of re-benchmarking.
_forward_tuned = triton.autotune(_configs(group=False), key=["H", "V", "n_bucket"])(
    _forward_heuristic
)
_dlogits_tuned = triton.autotune(_configs(group=True), key=["H", "n_bucket"])(_dlogits_heuristic)


# ---------------------------------------------------------------------------------------------
# launchers


def _flags(weight: Tensor) -> dict:
    return {
        "UPCAST": interpreting() and weight.dtype == torch.bfloat16,
        "IEEE": weight.dtype == torch.float32,
    }


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocab ranges per token block: enough programs for ~8 waves over the SMs (with 128-token
    blocks), so the last, partial wave costs little, and at most one range per 128 columns.
    (16k tokens, 132 SMs: 9 ranges of ~17k columns; 4k tokens: 33 ranges.)"""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRET_SMS
    token_blocks = math.ceil(n / 128)
    return max(1, min(math.ceil(8 * sms / token_blocks), math.ceil(v / 128)))


def _check(hidden: Tensor, weight: Tensor) -> None:
    if not (hidden.is_cuda or interpreting()):
        raise ValueError("the Triton log-prob kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if hidden.dtype != weight.dtype or hidden.dtype not in (
        torch.float32, torch.bfloat16, torch.float16,
    ):  # fmt: skip
        raise ValueError(f"unsupported dtypes {hidden.dtype} / {weight.dtype}")


def local_partials(
    hidden: Tensor, weight: Tensor, local_labels: Tensor, temperature: float, with_entropy: bool
) -> Tensor:
    """fp32 ``[4, n_splits, N]`` partial (m, s, S, z_y) of ``z = hidden @ weight^T / T`` over
    vocab ranges of this shard. `local_labels` (int32 ``[N]``) is each label's column in the
    shard, -1 where the shard does not own it (its z_y is then 0)."""
    _check(hidden, weight)
    n, hd = hidden.shape
    v = weight.shape[0]
    n_splits = _num_splits(n, v, hidden.device)
    part = torch.empty((4, n_splits, n), dtype=torch.float32, device=hidden.device)
    args = (
        hidden, weight, local_labels, part,
        n, v, hd, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, n_splits, triton.next_power_of_2(n),
    )  # fmt: skip
    flags = {"WITH_ENTROPY": with_entropy, **_flags(weight)}
    if interpreting():
        blocks = INTERPRET_BLOCKS
        grid = (n_splits, triton.cdiv(n, blocks["BLOCK_N"]))
        _forward_heuristic[grid](*args, **flags, **blocks)
    else:
        _forward_tuned[lambda meta: (n_splits, triton.cdiv(n, meta["BLOCK_N"]))](*args, **flags)
    return part


def scratch_width(n: int, vocab_local: int, chunk_size: int) -> int:
    """Columns per backward vocab chunk: the ``[N, width]`` dL/dz scratch holds about
    ``chunk_size * V_local`` elements, the size of one token chunk of the torch path's logits."""
    width = (chunk_size * vocab_local) // max(n, 1)
    if width >= 256:
        width -= width % 128  # whole tiles, aligned matmul operands
    return max(16, min(width, vocab_local))


def _mm_fp32_out_supported(a: Tensor) -> bool:
    """cuBLAS bf16/fp16 x bf16/fp16 -> fp32 (``torch.mm(..., out_dtype=)``, torch >= 2.8)."""
    return (
        a.is_cuda
        and a.dtype in (torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten.mm, "dtype_out")
    )


def backward(
    hidden: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    row_max: Tensor,
    log_sum: Tensor,
    entropy: Tensor,
    g_logp: Tensor | None,
    g_entropy: Tensor | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    chunk_size: int,
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dhidden, this shard's partial, in hidden's dtype; dL/dweight in weight's dtype)."""
    _check(hidden, weight)
    n, hd = hidden.shape
    v = weight.shape[0]
    width = scratch_width(n, v, chunk_size)
    single = width >= v
    scratch = torch.empty((n, width), dtype=weight.dtype, device=weight.device)
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_hidden = acc = tmp = None
    if need_hidden:
        if single:
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        else:  # fp32 running sum over vocab chunks, rounded to hidden's dtype once
            acc = torch.zeros((n, hd), dtype=torch.float32, device=hidden.device)
            if _mm_fp32_out_supported(hidden):
                tmp = torch.empty_like(acc)

    dummy = row_max  # stands in for an absent upstream gradient (never read)
    g_lp = g_logp.float().contiguous() if g_logp is not None else dummy
    g_h = g_entropy.float().contiguous() if g_entropy is not None else dummy
    flags = {"HAS_G_LOGP": g_logp is not None, "HAS_G_ENT": g_entropy is not None,
             **_flags(weight)}  # fmt: skip
    for v0 in range(0, v, width):
        cw = min(width, v - v0)
        dz = scratch[:, :cw]
        args = (
            hidden, weight, local_labels, row_max, log_sum, entropy, g_lp, g_h, scratch,
            n, cw, v0, hd, hidden.stride(0), hidden.stride(1), weight.stride(0),
            weight.stride(1), scratch.stride(0), 1.0 / temperature, triton.next_power_of_2(n),
        )  # fmt: skip
        if interpreting():
            blocks = {**INTERPRET_BLOCKS, "GROUP_N": 2}
            grid = (triton.cdiv(n, blocks["BLOCK_N"]) * triton.cdiv(cw, blocks["BLOCK_V"]),)
            _dlogits_heuristic[grid](*args, **flags, **blocks)
        else:
            _dlogits_tuned[
                lambda meta, cw=cw: (
                    triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(cw, meta["BLOCK_V"]),
                )
            ](*args, **flags)
        w_chunk = weight[v0 : v0 + cw]
        if grad_weight is not None:  # every vocab row is in one chunk: written once
            torch.mm(dz.t(), hidden, out=grad_weight[v0 : v0 + cw])
        if need_hidden:
            if single:
                torch.mm(dz, w_chunk, out=grad_hidden)
            elif dz.dtype == torch.float32:
                acc.addmm_(dz, w_chunk)
            elif tmp is not None:  # bf16 / fp16 operands, fp32 output from cuBLAS
                torch.mm(dz, w_chunk, out_dtype=torch.float32, out=tmp)
                acc.add_(tmp)
            else:  # CPU (interpreter tests): the product is rounded to the dtype per chunk
                acc.add_(dz @ w_chunk)
    del scratch, tmp
    if acc is not None:
        grad_hidden = acc.to(hidden.dtype)
    return grad_hidden, grad_weight
