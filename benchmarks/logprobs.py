"""Log-probs + entropy of sampled tokens: megarl's paths against a naive full-vocabulary one.

At vocab 151,936 and hidden 2,048 (bf16 hidden states and output weight), for each token count
the forward + backward of ``L = sum(a * log p(y) + b * H)`` is timed (CUDA events, after warmup;
median of ``--iters``) and its peak extra memory measured (``max_memory_allocated`` above the
level before the step, with the inputs already allocated and no gradients held), for

* ``naive``: ``log_softmax((h @ W^T).float() / T)``, gather, ``-(p * log p).sum()`` (autograd);
* ``chunked``: `vocab_parallel_logprobs(impl="torch")`, token chunks of ``--chunk-size``;
* ``fused``: `vocab_parallel_logprobs(impl="triton")`, the Triton kernels (no logits stored);
* ``matmuls``: the three bf16 logits matmuls alone (``h W^T``, ``dz W``, ``dz^T h``), the
  floor of any path that does not drop vocabulary columns (time only).

Before timing, a check phase compares each path with a float64 reference on a slice of tokens
(full vocabulary, temperature 0.7, a third of the labels the argmax) and the paths with each
other at the full shape. Goals (issue 8): fused peak extra memory <= 10% of naive's, fused time
<= 0.6x naive's.

    python benchmarks/logprobs.py [--tokens 4096 16384] [--iters 10] [--out PATH]
    python benchmarks/logprobs.py --smoke [--out PATH]   # tiny shapes on CPU (torch fallback)
    TRITON_INTERPRET=1 python benchmarks/logprobs.py --smoke  # the kernels, interpreted

Writes benchmarks/results/logprobs-<date>.json (GPU name, versions, shapes, the check, the rows,
the ratios and the table; ``--smoke`` writes only with ``--out``) and prints the table last.
Exits 1 when the fused path fails the check (after writing the results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (and this checkout's megarl onto sys.path)

from megarl.megatron.logprobs import vocab_parallel_logprobs  # noqa: E402

GOALS = {"memory_vs_naive": 0.10, "time_vs_naive": 0.60}
PATHS = ("naive", "chunked", "fused")
CHECK_TEMPERATURE = 0.7
# The fused path's check: fp32 accumulators, so log-prob / entropy to ~1e-5 of float64; the
# gradients pass through bf16 dL/dz and bf16 outputs (relative to the largest entry).
FUSED_CHECK_LIMITS = {"logp_abs": 2e-3, "entropy_abs": 2e-3, "grad_hidden_rel": 3e-2,
                      "grad_weight_rel": 3e-2}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the paths


def naive_logprobs(h: Tensor, w: Tensor, labels: Tensor, temperature: float):
    logits = (h @ w.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def run_path(path: str, h, w, labels, temperature: float, chunk_size: int, impl: str):
    if path == "naive":
        return naive_logprobs(h, w, labels, temperature)
    return vocab_parallel_logprobs(
        h, w, labels, temperature=temperature, chunk_size=chunk_size,
        impl="torch" if path == "chunked" else impl,
    )  # fmt: skip


def step_fn(path, h, w, labels, a, b, temperature, chunk_size, impl) -> Callable[[], tuple]:
    """One forward + backward of sum(a logp + b H); gradients land in h.grad and w.grad."""

    def step():
        logp, ent = run_path(path, h, w, labels, temperature, chunk_size, impl)
        ((a * logp).sum() + (b * ent).sum()).backward()
        return logp.detach(), ent.detach()

    return step


def matmul_step(h: Tensor, w: Tensor) -> Callable[[], None]:
    """The three logits matmuls of forward + backward, nothing else."""

    def step():
        with torch.no_grad():
            z = h @ w.t()
            z @ w  # dL/dh
            z.t() @ h  # dL/dW

    return step


# ---------------------------------------------------------------------------------------------
# measuring


def peak_extra_bytes(step: Callable, reset: Callable, device: torch.device) -> int:
    """Peak bytes allocated during one `step` above the level just before it (on the CPU, of
    the storages created during it: ``_common.live_bytes``)."""
    reset()
    _common.synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        _common.peak_memory_reset(device)
        step()
        _common.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _common.live_bytes() as tracker:
        step()
    return tracker.peak


# ---------------------------------------------------------------------------------------------
# data and checks


def make_inputs(n: int, hidden: int, vocab: int, device, dtype, seed: int = 0):
    """Hidden states ~ N(0, 1) and a weight scaled so the logits have std ~3 (LM-like, max
    ~15); labels uniform; upstream weights a, b ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device) * (3 / hidden**0.5)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    a = torch.randn(n, generator=g, device=device)
    b = torch.randn(n, generator=g, device=device)
    return h, w, labels, a, b


def rel_err(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| relative to max |ref|."""
    scale = ref.double().abs().max().clamp_min(1e-30)
    return float((x.double() - ref.double()).abs().max() / scale)


def abs_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref.double()).abs().max())


def errors(got: tuple, ref: tuple) -> dict:
    """(logp, entropy, dL/dh, dL/dW) against `ref`: absolute for the values, relative to the
    largest entry for the gradients."""
    return {"logp_abs": abs_err(got[0], ref[0]), "entropy_abs": abs_err(got[1], ref[1]),
            "grad_hidden_rel": rel_err(got[2], ref[2]), "grad_weight_rel": rel_err(got[3], ref[3])}


def with_grads(path, h, w, labels, a, b, temperature, chunk_size, impl):
    hl = h.detach().clone().requires_grad_(True)
    wl = w.detach().clone().requires_grad_(True)
    logp, ent = step_fn(path, hl, wl, labels, a, b, temperature, chunk_size, impl)()
    return logp, ent, hl.grad, wl.grad


def check_vs_float64(h, w, labels, a, b, n_check: int, chunk_size: int, impl: str) -> dict:
    """Each path against float64 on the first `n_check` tokens (full vocabulary)."""
    t = CHECK_TEMPERATURE
    h, labels, a, b = h[:n_check], labels[:n_check].clone(), a[:n_check], b[:n_check]
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    z = (h64 @ w64.t()) / t
    top = z.detach().argmax(-1)
    labels[: n_check // 3] = top[: n_check // 3]  # peaked tokens (log p ~ 0) too
    log_p = torch.log_softmax(z, dim=-1)
    ref_lp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_h = -(log_p.exp() * log_p).sum(-1)
    (a.double() * ref_lp + b.double() * ref_h).sum().backward()
    ref = (ref_lp.detach(), ref_h.detach(), h64.grad, w64.grad)
    del z, log_p
    out = {}
    for path in PATHS:
        got = with_grads(path, h, w, labels, a, b, t, chunk_size, impl)
        out[path] = errors(got, ref)
        del got
    return out


def check_agreement(h, w, labels, a, b, temperature, chunk_size, impl) -> dict:
    """chunked and fused against naive at the full shape (one path's outputs alive at a time)."""
    base = with_grads("naive", h, w, labels, a, b, temperature, chunk_size, impl)
    out = {}
    for path in ("chunked", "fused"):
        got = with_grads(path, h, w, labels, a, b, temperature, chunk_size, impl)
        out[f"{path}_vs_naive"] = errors(got, base)
        del got
    return out


# ---------------------------------------------------------------------------------------------
# the run


def measure(path, h, w, labels, a, b, temperature, chunk_size, impl, device, warmup, iters):
    def reset():
        h.grad = None
        w.grad = None

    step = matmul_step(h, w) if path == "matmuls" else step_fn(
        path, h, w, labels, a, b, temperature, chunk_size, impl)  # fmt: skip
    if device.type == "cuda":  # blocks cached by earlier phases go back (hygiene only:
        torch.cuda.empty_cache()  # max_memory_allocated counts allocations, not the cache)
    try:
        for _ in range(warmup):  # includes Triton's compilation and autotuning
            reset()
            step()
        peak = None if path == "matmuls" else peak_extra_bytes(step, reset, device)
        times = _common.time_ms(step, device, warmup=0, iters=iters,
                                reset=lambda: (reset(), _common.synchronize(device)))
    except torch.OutOfMemoryError as err:
        reset()
        return {"path": path, "error": f"out of memory: {str(err).splitlines()[0]}"}
    finally:
        reset()
    return {"path": path, "ms_median": statistics.median(times), "ms_min": min(times),
            "ms_all": times, "peak_extra_bytes": peak}  # fmt: skip


def autotuned() -> dict:
    """The configurations the autotuner picked, per key (empty off CUDA)."""
    try:
        from megarl.megatron import fused_logprobs as fl
    except ImportError:
        return {}
    out = {}
    for name, tuner in (("forward", fl._forward_tuned), ("dlogits", fl._dlogits_tuned)):
        out[name] = {str(k): str(v) for k, v in getattr(tuner, "cache", {}).items()}
    return out


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): --smoke runs the kernels."""
    try:
        from megarl.megatron import fused_logprobs
    except ImportError:
        return False
    return fused_logprobs.interpreting()


def run(args: argparse.Namespace) -> dict:
    device = _common.pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    impl = "triton" if device.type == "cuda" or interpreting() else "auto"  # CPU: torch
    result = {
        **_common.environment(device),  # at the top level of the record (GPU, versions, date)
        "shapes": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
                   "dtype": args.dtype, "temperature": args.temperature,
                   "chunk_size": args.chunk_size, "check_tokens": args.check_tokens},
        "fused_impl": ("triton (interpreter)" if interpreting() and impl == "triton" else
                       impl if impl == "triton" else "torch (CPU fallback of impl='auto')"),
        "goals": GOALS, "fused_check_limits": FUSED_CHECK_LIMITS,
        "warmup": args.warmup, "iters": args.iters, "rows": [], "ratios": {},
    }  # fmt: skip
    n_max = max(args.tokens)
    h, w, labels, a, b = make_inputs(n_max, args.hidden, args.vocab, device, dtype)
    h.requires_grad_(True)
    w.requires_grad_(True)

    check = check_vs_float64(h, w, labels, a, b, min(args.check_tokens, n_max), args.chunk_size,
                             impl)  # fmt: skip
    result["check_vs_float64"] = check
    result["check_passed"] = all(check["fused"][k] <= lim for k, lim in FUSED_CHECK_LIMITS.items())

    for n in args.tokens:
        hn = h[:n].detach().requires_grad_(True)  # a leaf view: its grad is [n, hidden]
        ln, an, bn = labels[:n], a[:n], b[:n]
        if not args.skip_agreement:
            result.setdefault("agreement", {})[str(n)] = check_agreement(
                hn, w, ln, an, bn, args.temperature, args.chunk_size, impl)  # fmt: skip
        rows = {}
        for path in (*PATHS, "matmuls"):
            row = measure(path, hn, w, ln, an, bn, args.temperature, args.chunk_size, impl,
                          device, args.warmup, args.iters)  # fmt: skip
            row["tokens"] = n
            rows[path] = row
            result["rows"].append(row)
            extra = _common.human_bytes(row.get("peak_extra_bytes"), binary=True)
            print(f"  tokens {n:>6} {path:>8}: " + (
                row.get("error") or f"{row['ms_median']:.2f} ms, peak extra {extra}"), flush=True)
        result["ratios"][str(n)] = ratios(rows)
    result["autotuned"] = autotuned()
    return result


def ratios(rows: dict) -> dict:
    naive, out = rows["naive"], {}
    for path in ("chunked", "fused"):
        r = rows[path]
        if "error" in naive or "error" in r:
            continue
        t = r["ms_median"] / naive["ms_median"]
        m = r["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
        out[path] = {"time_vs_naive": t, "memory_vs_naive": m,
                     "meets_time_goal": t <= GOALS["time_vs_naive"],
                     "meets_memory_goal": m <= GOALS["memory_vs_naive"]}  # fmt: skip
    if "error" not in rows["matmuls"] and "error" not in rows["fused"]:
        out["fused_vs_matmuls_time"] = rows["fused"]["ms_median"] / rows["matmuls"]["ms_median"]
    return out


def table(result: dict) -> str:
    lines = [
        f"{result.get('gpu') or result['device']}, torch {result['torch']}, "
        f"triton {result['triton']}, hidden {result['shapes']['hidden']}, "
        f"vocab {result['shapes']['vocab']}, {result['shapes']['dtype']}",
        "| tokens | path | fwd+bwd ms (median) | peak extra | time / naive | memory / naive |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rat = result["ratios"].get(str(r["tokens"]), {}).get(r["path"], {})
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['path']} | {r['error']} | | | |")
            continue
        t = f"{rat['time_vs_naive']:.2f}x" if rat else ""
        m = f"{rat['memory_vs_naive']:.1%}" if rat else ""
        lines.append(f"| {r['tokens']} | {r['path']} | {r['ms_median']:.2f} | "
                     f"{_common.human_bytes(r['peak_extra_bytes'], binary=True)} | {t} | "
                     f"{m} |")  # fmt: skip
    lines.append(f"goals: fused memory <= {GOALS['memory_vs_naive']:.0%} of naive, "
                 f"time <= {GOALS['time_vs_naive']}x naive")  # fmt: skip
    for n, rat in result["ratios"].items():
        f = rat.get("fused")
        if f:
            lines.append(f"  {n} tokens: fused time {'MET' if f['meets_time_goal'] else 'MISSED'}"
                         f", memory {'MET' if f['meets_memory_goal'] else 'MISSED'}")  # fmt: skip
    c = result["check_vs_float64"]
    lines.append("check vs float64 (" + ", ".join(
        f"{p}: logp {c[p]['logp_abs']:.1e} H {c[p]['entropy_abs']:.1e} "
        f"dh {c[p]['grad_hidden_rel']:.1e} dW {c[p]['grad_weight_rel']:.1e}" for p in PATHS)
        + f"): fused {'passed' if result['check_passed'] else 'FAILED'}")  # fmt: skip
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--check-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-agreement", action="store_true",
                   help="skip the full-shape comparison of the paths (it runs each once more)")
    _common.add_common_args(p, "tiny shapes on CPU (the torch fallback); writes only with --out")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.vocab = [48, 96], 32, 1000
        args.check_tokens, args.warmup, args.iters, args.chunk_size = 24, 1, 2, 16
        args.dtype, args.device = "float32", args.device or "cpu"
    if args.device is None:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or --smoke for the CPU fallback")
        args.device = "cuda"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.manual_seed(0)
    result = run(args)
    _common.publish("logprobs", result, table, args, result["date"])
    if not result["check_passed"]:
        print("fused path FAILED the float64 check", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["check_passed"] else 1)
