"""Run as a script: for each layout case (JSON on stdin), does megatron-core itself accept it?

Megatron's own acceptance, without megarl's rules: its `TransformerConfig`, its
`initialize_model_parallel` in a world of the case's size (torch's fake process group: one
process stands in for every rank), its vocabulary split, and its GPT model (local spec) built on
the meta device for rank 0. Prints one JSON line per case: ``{"ok": bool, "why": str}``.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


def megatron_accepts(hf: dict[str, Any], layout: dict[str, Any], world: int) -> str | None:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.utils import VocabUtility
    from megatron.core.transformer import TransformerConfig

    tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
    ep, etp, vpp = layout.get("ep", 1), layout.get("etp", 1), layout.get("vpp")
    sp = layout.get("sequence_parallel", tp > 1)
    experts = hf.get("num_experts") or None
    try:
        config = TransformerConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf["num_key_value_heads"], kv_channels=hf.get("head_dim"),
            ffn_hidden_size=hf["intermediate_size"], num_moe_experts=experts,
            moe_ffn_hidden_size=hf.get("moe_intermediate_size") if experts else None,
            moe_router_topk=hf.get("num_experts_per_tok", 2) if experts else 2,
            moe_token_dispatcher_type="alltoall" if experts else "allgather",
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            sequence_parallel=sp, pipeline_dtype=torch.float32, params_dtype=torch.float32,
            use_cpu_initialization=True, perform_initialization=False,
            gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False,
            qk_layernorm=True,
        )
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            create_gloo_process_groups=False)
        try:
            VocabUtility.vocab_range_from_global_vocab_size(hf["vocab_size"], 0, tp)
            spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                            qk_layernorm=True)
            with torch.device("meta"):
                GPTModel(config, spec, vocab_size=hf["vocab_size"],
                         max_sequence_length=hf.get("max_position_embeddings", 128),
                         vp_stage=0 if vpp else None)
        finally:
            ps.destroy_model_parallel()
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def main() -> None:
    warnings.simplefilter("ignore")
    if not torch.cuda.is_available():  # CPU placement only: megatron's rules are untouched
        from megarl.megatron import cpu

        cpu.install()
    cases = json.load(sys.stdin)
    for hf, layout, world in cases:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            why = megatron_accepts(hf, layout, world)
        finally:
            dist.destroy_process_group()
        print(json.dumps({"ok": why is None, "why": why or ""}), flush=True)


if __name__ == "__main__":
    main()
