"""The Triton log-prob / entropy kernels (megarl/megatron/fused_logprobs.py) against the float64
full-vocabulary reference.

Here (CPU) the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess
(tests/unit/fused_interpreter_cases.py): values and gradients w.r.t. hidden states and weight,
temperatures != 1, one and several backward vocab chunks, padded tiles, one output unused,
bf16 inputs, the kernel's raw partials on each half of the vocabulary (rank r of 2, labels
outside the shard), and two gloo tensor-parallel ranks. Both kernels are also compiled for sm_90
(H100) with the ptxas Triton ships, which needs no GPU. The ``gpu`` tests run the compiled,
autotuned kernels where CUDA is visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from megarl.megatron import fused_logprobs
from megarl.megatron.logprobs import LogProbContext, vocab_parallel_logprobs
from tests.unit import fused_interpreter_cases as cases
from tests.unit.test_vocab_parallel_logprobs import (
    assert_grads,
    assert_values,
    make_case,
    ours,
    reference,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> Path:
    """Run every interpreter case once (one subprocess, ~10-30 s); the directory of results."""
    out = tmp_path_factory.mktemp("fused_interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.fused_interpreter_cases", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cases.CASES))
def test_interpreted_kernels_match_float64_reference(interpreted, name):
    c = cases.CASES[name]
    h, w, labels, a, b = cases.case_data(name)
    with_entropy = c.get("with_entropy", True)
    ref_lp, ref_h, ref_gh, ref_gw = reference(
        h, w, labels, a, b if with_entropy else torch.zeros_like(b), c["temperature"]
    )
    logp, ent, gh, gw = torch.load(interpreted / f"{name}.pt")
    dtype = c.get("dtype", torch.float32)
    assert logp.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    # The logits are fp32 accumulators of exact products (the data are small multiples of
    # 1/16): log-prob and entropy are as exact in bf16 as in fp32.
    assert_values(logp, ref_lp)
    if with_entropy:
        assert_values(ent, ref_h)
    else:
        assert ent is None
    if dtype == torch.float32:
        assert_grads(gh, ref_gh)
        assert_grads(gw, ref_gw)
    else:  # dL/dz is rounded to bf16 before the two matmuls, as the torch path does
        for x, r in ((gh, ref_gh), (gw, ref_gw)):
            torch.testing.assert_close(x.double(), r, rtol=0.05, atol=0.05 * r.abs().max().item())


@pytest.mark.slow
def test_interpreted_partials_of_each_vocab_shard(interpreted):
    """The forward kernel on vocab half r of 2 (columns offset by r * V/2): after merging its
    vocab ranges, the shard's max, sum-exp, sum exp * (z - m) and the label logit (0 for labels
    the shard does not own) match float64."""
    h, w, labels, _, _ = cases.tp_data()
    half, t = cases.TP["vocab"] // 2, cases.TP["temperature"]
    parts = torch.load(interpreted / "shard_partials.pt")
    owned_by = labels // half
    assert (owned_by == 0).any() and (owned_by == 1).any()
    for rank, part in enumerate(parts):
        z = (h.double() @ w[rank * half : (rank + 1) * half].double().t()) / t
        m_ref = z.amax(-1)
        e = (z - m_ref[:, None]).exp()
        local = labels - rank * half
        owned = owned_by == rank
        zy_ref = torch.where(owned, z.gather(1, local.clamp(0, half - 1)[:, None])[:, 0], 0.0)
        m_p, s_p, ent_p, zy_p = part.double().unbind(0)
        m = m_p.amax(0)
        shift = m_p - m
        s = (shift.exp() * s_p).sum(0)
        ent = (shift.exp() * (ent_p + s_p * shift)).sum(0)
        assert_values(m, m_ref)
        assert_values(s, e.sum(-1))
        assert_values(ent, (e * (z - m_ref[:, None])).sum(-1))
        assert_values(zy_p.sum(0), zy_ref)
        assert torch.all(zy_p.sum(0)[~owned] == 0)


@pytest.mark.slow
def test_interpreted_two_tensor_parallel_ranks(interpreted):
    h, w, labels, a, b = cases.tp_data()
    ref_lp, ref_h, ref_gh, ref_gw = reference(h, w, labels, a, b, cases.TP["temperature"])
    r0, r1 = (torch.load(interpreted / f"tp_rank{r}.pt") for r in range(2))
    for logp, ent, _, _ in (r0, r1):  # every rank holds the full-vocabulary values
        assert_values(logp, ref_lp)
        assert_values(ent, ref_h)
    assert_grads(r0[2] + r1[2], ref_gh)  # partial hidden grads: the caller sums them over TP
    assert_grads(torch.cat([r0[3], r1[3]]), ref_gw)


# ---------------------------------------------------------------------------------------------
# selection and helpers (no kernels run)


def test_impl_selection_on_cpu():
    h, w, labels, _, _ = make_case(n=6, vocab=16, hidden=8, temperature=1.0)
    base = vocab_parallel_logprobs(h, w, labels, impl="torch")
    auto = vocab_parallel_logprobs(h, w, labels)  # CPU: the torch path
    for x, y in zip(auto, base, strict=True):
        assert torch.equal(x, y)
    if not fused_logprobs.interpreting():
        with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
            vocab_parallel_logprobs(h, w, labels, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        vocab_parallel_logprobs(h, w, labels, impl="cuda")
    assert LogProbContext().impl == "auto"


def test_scratch_width_bounds_the_backward_scratch():
    v = 151936
    for n in (1, 100, 4096, 16384, 65536):
        width = fused_logprobs.scratch_width(n, v, chunk_size=1024)
        assert 16 <= width <= v
        assert n * width <= max(1024 * v, n * 16)  # about chunk_size x V_local elements
        if width < v and width >= 256:
            assert width % 128 == 0
    assert fused_logprobs.scratch_width(1000, v, chunk_size=1024) == v  # one chunk
    assert fused_logprobs.scratch_width(4096, 40, chunk_size=1) == 16


# ---------------------------------------------------------------------------------------------
# compiled for Hopper without a GPU (Triton's code generator and the ptxas it ships)


def _hopper_compile(fn, dtype: str, config):
    """Compile `fn` for sm_90 with `config`'s blocks, as a launch with contiguous 16-aligned
    tensors would specialise it (unit strides constant, pointers and sizes divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr_types = {"h_ptr": dtype, "w_ptr": dtype, "dz_ptr": dtype, "y_ptr": "i32"}
    const = {"stride_hk": 1, "stride_wk": 1, "UPCAST": False, "IEEE": dtype == "fp32",
             "EVEN_K": True, "WITH_ENTROPY": True, "HAS_G_LOGP": True, "HAS_G_ENT": True,
             **config.kwargs}  # fmt: skip
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in ("stride_hk", "stride_wk"):
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + ptr_types.get(p.name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name == "inv_t":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    const = {k: v for k, v in const.items() if sig.get(k) == "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper(dtype):
    """Both kernels lower to sm_90 code (the tensor-core wgmma path for bf16) within the shared
    memory of one SM, for the first autotuning config (128 x 128 x 64, 8 warps, 3 stages)."""
    pytest.importorskip("triton.backends.nvidia")
    config = fused_logprobs._configs(group=True)[0]
    for fn in (fused_logprobs._forward_kernel, fused_logprobs._dlogits_kernel):
        kernel = _hopper_compile(fn, dtype, config)
        assert kernel.metadata.shared <= 227 * 1024
        if dtype == "bf16":
            assert "wgmma.mma_async" in kernel.asm["ptx"], fn.__name__


# ---------------------------------------------------------------------------------------------
# compiled kernels (CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1024, 8])
def test_cuda_fp32_matches_float64_reference(temperature, chunk_size):
    # 300 tokens, 1000 columns, hidden 200: no dimension a multiple of the tiles
    h, w, labels, a, b = make_case(n=300, vocab=1000, hidden=200, temperature=temperature)
    ref = reference(h, w, labels, a, b, temperature)
    got = ours(h.cuda(), w.cuda(), labels.cuda(), a.cuda(), b.cuda(), temperature, chunk_size,
               impl="triton")  # fmt: skip
    assert_values(got[0].cpu(), ref[0])
    assert_values(got[1].cpu(), ref[1])
    assert_grads(got[2].cpu(), ref[2])
    assert_grads(got[3].cpu(), ref[3])


@pytest.mark.gpu
def test_cuda_bf16_close_to_reference_and_torch_path():
    torch.manual_seed(0)
    n, v, hd, t = 1000, 5000, 256, 0.7
    h = torch.randn(n, hd, device="cuda").bfloat16()
    w = (torch.randn(v, hd, device="cuda") / hd**0.5).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda")
    a, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    ref = reference(h.cpu().float(), w.cpu().float(), labels.cpu(), a.cpu().double(),
                    b.cpu().double(), t)  # fmt: skip
    fused = ours(h, w, labels, a, b, t, 64, impl="triton")
    chunked = ours(h, w, labels, a, b, t, 64, impl="torch")
    # fp32 accumulators: as close to float64 as fp32 allows; the torch path rounds the logits
    # to bf16 first (errors ~ |z| / 256).
    torch.testing.assert_close(fused[0].cpu().double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[1].cpu().double(), ref[1], rtol=1e-4, atol=1e-4)
    for i in (0, 1):
        torch.testing.assert_close(fused[i], chunked[i], rtol=0.02, atol=0.05)
    for i in (2, 3):
        r = ref[i]
        torch.testing.assert_close(fused[i].cpu().double(), r, rtol=0.05,
                                   atol=0.02 * r.abs().max().item())  # fmt: skip
