#!/usr/bin/env python
"""Check that an exported HF checkpoint is the model megarl evaluated: a fresh engine that never
saw the training process decodes the held-out problems greedily and must give the same
responses, answers and greedy accuracy as megarl's own evaluation at that step.

    megarl train CONFIG checkpoint.save_hf=true eval.greedy=true ...
    python tools/check_export.py CONFIG --hf RUN/hf --against RUN/eval/step_000040.jsonl
    .venv-vllm/bin/python tools/check_export.py CONFIG --hf RUN/hf --against ... --engine vllm

``--engine transformers`` (default) decodes with ``AutoModelForCausalLM.generate`` one prompt at
a time (no padding); ``--engine vllm`` with a new ``vllm.LLM`` on the folder. The tokenizer is
the export's own. Prompts, answers and grades come from megarl's data and reward code (what
is checked is the model and its export, not the grader). The record to check against is a
run's ``eval/step_N.jsonl`` (written at every evaluation) or ``megarl eval --samples``, made
with ``eval.greedy=true``. Compare like with like: the embedded (transformers) engine's record
with ``--engine transformers``, a ``rollout.engine=vllm`` run's with ``--engine vllm``; across
engines, kernels differ and a near-tie can decode differently. Exit 0 when every response
matches, 1 otherwise; ``--out`` writes the comparison as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def decode_transformers(hf: Path, prompts: list[list[int]], max_tokens: int,
                        eos: int) -> list[list[int]]:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos)
            out.append(_until_eos(y[0, len(ids):].tolist(), eos))
    return out


def decode_vllm(hf: Path, prompts: list[list[int]], max_tokens: int,
                eos: int) -> list[list[int]]:  # fmt: skip
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    llm = vllm.LLM(model=str(hf), dtype="float32", enforce_eager=True, seed=0,
                   kv_cache_memory_bytes=1 << 30, max_model_len=max(map(len, prompts))
                   + max_tokens)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=[eos])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [_until_eos(list(o.outputs[0].token_ids), eos) for o in outputs]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def compare(config_path: str, overrides: list[str], hf: Path, against: Path,
            engine: str) -> dict[str, Any]:  # fmt: skip
    from transformers import AutoTokenizer

    from megarl.assemble import Rewards
    from megarl.config import load_config
    from megarl.evaluate import load_benchmark

    config = load_config(config_path, overrides)
    tokenizer = AutoTokenizer.from_pretrained(hf)  # the export's own tokenizer
    records = {(r["benchmark"], r["index"]): r
               for r in map(json.loads, against.read_text().splitlines())}
    if any(r.get("greedy_response") is None for r in records.values()):
        raise SystemExit(f"error: {against} has no greedy responses: evaluate with "
                         "eval.greedy=true")
    max_tokens = config.eval.max_response_len or config.rollout.max_response_len
    eos = int(tokenizer.eos_token_id)
    decode = decode_vllm if engine == "vllm" else decode_transformers
    rewards = Rewards(config)
    report: dict[str, Any] = {"engine": engine, "hf": str(hf), "against": str(against),
                              "benchmarks": {}}
    try:
        for entry in config.data.eval:
            bench = load_benchmark(config, tokenizer, entry)
            texts = [tokenizer.decode(t) for t in decode(
                hf, [p.prompt_ids for p in bench.prompts], max_tokens, eos)]
            scores, _ = rewards(texts, [p.answer for p in bench.prompts])
            same, missing, fresh_correct, recorded_correct = 0, 0, 0, 0
            for p, text, score in zip(bench.prompts, texts, scores, strict=True):
                record = records.get((bench.name, int(p.index)))
                if record is None:
                    missing += 1
                    continue
                same += text == record["greedy_response"]
                fresh_correct += score > 0.5
                recorded_correct += bool(record["greedy_correct"])
            n = len(bench.prompts)
            report["benchmarks"][bench.name] = {
                "problems": n, "missing_in_record": missing, "same_response": same,
                "greedy@1_fresh": fresh_correct / n, "greedy@1_recorded": recorded_correct / n}
    finally:
        rewards.close()
    report["ok"] = all(b["same_response"] == b["problems"] and not b["missing_in_record"]
                       for b in report["benchmarks"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the run's config (its data.eval and eval settings)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--hf", type=Path, required=True, help="the exported HF folder")
    parser.add_argument("--against", type=Path, required=True,
                        help="megarl's evaluation record (RUN/eval/step_N.jsonl)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--out", type=Path, help="write the comparison as JSON")
    args = parser.parse_args(argv)
    for path, what in ((args.hf / "config.json", "--hf"), (args.against, "--against")):
        if not path.is_file():
            raise SystemExit(f"error: {what}: {path} does not exist")
    report = compare(args.config, args.overrides, args.hf, args.against, args.engine)
    for name, row in report["benchmarks"].items():
        print(f"{name}: {row['same_response']}/{row['problems']} greedy responses identical; "
              f"greedy@1 fresh {row['greedy@1_fresh']:.3f}, megarl "
              f"{row['greedy@1_recorded']:.3f} ({args.engine})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
