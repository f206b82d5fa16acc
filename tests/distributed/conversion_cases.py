"""HF <-> Megatron conversion checks, run inside the launches of tests/distributed/layouts.py.

For a tiny transformers checkpoint (Qwen3-MoE, Qwen3 dense, Qwen2, Llama) and a layout:
- HF -> Megatron (live load): Megatron logits equal transformers' logits (fp32, 1e-5);
- Megatron -> HF (streamed export): every tensor is bit-identical to the source checkpoint;
- Megatron(previous layout of the launch) -> HF dir -> Megatron(this layout): identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megarl.convert.hf_io import HFCheckpoint
from megarl.layout import ModelFacts, ParallelConfig
from megarl.megatron.dist_checkpoint import load_distributed, save_distributed
from megarl.megatron.model import build_model, transformer_config_from_hf
from megarl.megatron.parallel import destroy_parallel, initialize_parallel
from megarl.megatron.weights import export_hf_weights, load_hf_weights, save_hf_checkpoint

TINY_HF: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "initializer_range": 0.1, "rope_theta": 10000.0,
    },
    "qwen3": {
        "model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "tie_word_embeddings": True,
        "initializer_range": 0.1,
    },
    "llama": {
        "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False, "initializer_range": 0.1,
    },
    "qwen2": {  # q/k/v biases (DeepSeek-R1-Distill-Qwen), no qk-norm
        "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False, "initializer_range": 0.1,
        "use_sliding_window": False,
    },
}  # fmt: skip
LAYOUTS = {
    "1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}, "tp2ep2": {"tp": 2, "ep": 2},
    "tp2pp2": {"tp": 2, "pp": 2}, "tp2pp2ep2": {"tp": 2, "pp": 2, "ep": 2},
}  # fmt: skip
TOL = 1e-5


def write_tiny_checkpoints(root: Path) -> None:
    """One transformers checkpoint per model type, with non-trivial norm weights and biases."""
    for model_type, config in TINY_HF.items():
        write_checkpoint(root / model_type, config)


def write_checkpoint(path: Path, config: dict[str, Any], seed: int = 0) -> None:
    """A randomly initialised fp32 transformers checkpoint of `config` (an HF config dict),
    with non-trivial norm weights and biases (transformers initialises norms to one and biases
    to zero, which would hide a wrong norm or bias mapping)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(path)


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    with torch.no_grad():
        return model(ids).logits


def forward_logits(models: list[Any], ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, V]`` on the last pipeline stage (None elsewhere); `ids`
    on the models' device."""
    b, s = ids.shape
    position_ids = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, -1)

    def step(iterator, model):
        batch = next(iterator)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)
            return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logits": full}

        return model(batch, position_ids, None), collect

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter([ids]) for _ in models]
            if len(models) > 1 else iter([ids]), model=models, num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True,
        )  # fmt: skip
    return out[0]["logits"] if ps.is_pipeline_last_stage() else None


def build(hf_config: dict[str, Any], layout: str) -> list[Any]:
    """A randomly initialised model in `layout` (its process groups made anew)."""
    parallel = ParallelConfig(**LAYOUTS[layout])
    initialize_parallel(parallel, ModelFacts.from_hf(hf_config), seed=7)
    config = transformer_config_from_hf(hf_config, parallel, dtype="float32",
                                        use_transformer_engine=False)
    return build_model(config, hf_config, use_transformer_engine=False)


def load(path: Path, layout: str) -> tuple[list[Any], dict[str, Any]]:
    checkpoint = HFCheckpoint(path)
    models = build(checkpoint.config, layout)
    load_hf_weights(models, checkpoint)
    return models, checkpoint.config


def run_case(model_type: str, layout: str, root: Path, previous: str | None) -> dict[str, float]:
    """Worst errors of one (model, layout) case. Writes this layout's HF export and
    distributed checkpoint for the next case, which loads them (`previous` is its layout)."""
    source = root / model_type
    ids = torch.randint(0, TINY_HF[model_type]["vocab_size"], (2, 12),
                        generator=torch.Generator().manual_seed(11))
    expected = _hf_logits(source, ids)
    models, config = load(source, layout)
    logits = forward_logits(models, ids)

    def worst(other: torch.Tensor | None, reference: torch.Tensor | None) -> float:
        if other is None or reference is None:  # not the last pipeline stage
            return 0.0
        return float((other - reference).abs().max())

    errs = {"logits": worst(logits, expected)}
    original = HFCheckpoint(source)
    exported = dict(export_hf_weights(models, config))
    names = set(original.names()) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    bad = [n for n in names if n not in exported or not torch.equal(exported[n],
                                                                      original.tensor(n))]
    errs["export_mismatches"] = float(len(bad) + len(set(exported) - names))

    out = root / f"exported-{model_type}-{layout}"
    save_hf_checkpoint(models, str(out), config, tokenizer_from=str(source), overwrite=True,
                       max_shard_bytes=50_000)
    # distributed checkpoints: the offline conversion (tools/convert_hf_to_megatron.py) loads
    # into this layout; this layout's save is read back by the next case and, offline, to HF
    fresh = build(config, layout)
    load_distributed(root / f"dist-{model_type}", fresh, config)
    errs["dist_logits"] = worst(forward_logits(fresh, ids), expected)
    save_distributed(root / f"saved-{model_type}-{layout}", models, config,
                     tokenizer_from=source)
    errs["cross_layout"] = errs["dist_cross_layout"] = 0.0
    if previous is not None:  # Megatron(previous layout) -> HF / dist -> Megatron(this layout)
        destroy_parallel()
        again, _ = load(root / f"exported-{model_type}-{previous}", layout)
        errs["cross_layout"] = worst(forward_logits(again, ids), logits)
        again = build(config, layout)
        load_distributed(root / f"saved-{model_type}-{previous}", again, config)
        errs["dist_cross_layout"] = worst(forward_logits(again, ids), logits)
    dist.barrier()
    errs["written_files"] = 0.0
    if dist.get_rank() == 0:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        errs["written_files"] = 0.0 if len(set(index["weight_map"].values())) > 1 else 1.0
    destroy_parallel()
    return errs


def passes(errs: dict[str, float]) -> bool:
    close = ("logits", "dist_logits")
    return all(errs[k] <= TOL for k in close) and all(
        v == 0.0 for k, v in errs.items() if k not in close
    )


def offline_round_trip(root: Path, model_type: str) -> dict[str, float]:
    """HF -> distributed checkpoint -> HF in one process (the converters of tools/): every
    tensor bit-identical, and transformers loads the result with no missing/unexpected key."""
    import transformers

    from megarl.megatron.hf_conversion import convert_hf_to_megatron, convert_megatron_to_hf

    source = root / model_type
    convert_hf_to_megatron(source, root / f"dist-{model_type}", overwrite=True)
    back = root / f"roundtrip-{model_type}"
    convert_megatron_to_hf(root / f"dist-{model_type}", back, overwrite=True,
                           max_shard_bytes=50_000)
    errs = {"mismatches": float(len(_mismatches(HFCheckpoint(source), HFCheckpoint(back))))}
    _, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    errs["hf_load_problems"] = float(sum(len(info[k]) for k in (
        "missing_keys", "unexpected_keys", "mismatched_keys")))  # fmt: skip
    return errs


def saved_to_hf(root: Path, saved: str) -> dict[str, float]:
    """A checkpoint saved from a live layout, converted offline to HF: bit-identical."""
    from megarl.megatron.hf_conversion import convert_megatron_to_hf

    model_type = saved.split("-")[1]
    back = root / f"{saved}-hf"
    convert_megatron_to_hf(root / saved, back, overwrite=True)
    return {"mismatches": float(len(_mismatches(HFCheckpoint(root / model_type),
                                                HFCheckpoint(back))))}


def _mismatches(a: HFCheckpoint, b: HFCheckpoint) -> list[str]:
    names = set(a.names())
    bad = [n for n in names if n not in b.names() or not torch.equal(a.tensor(n), b.tensor(n))]
    return bad + sorted(set(b.names()) - names)


if __name__ == "__main__":  # offline ROOT | saved ROOT DIR...: one CASE line per check
    import sys

    mode, root = sys.argv[1], Path(sys.argv[2])
    checks = [(f"offline-{m}", lambda m=m: offline_round_trip(root, m)) for m in TINY_HF] \
        if mode == "offline" else [(s, lambda s=s: saved_to_hf(root, s)) for s in sys.argv[3:]]
    ok = True
    for name, check in checks:
        errs = check()
        good = all(v == 0.0 for v in errs.values())
        ok &= good
        print(f"CASE {name} hf {'PASS' if good else 'FAIL'} "
              + " ".join(f"{k}={v:.0f}" for k, v in errs.items()), flush=True)
    sys.exit(0 if ok else 1)
