"""megatron-core GPTModel chunks from a Hugging Face ``config.json`` (Qwen3-MoE, Qwen3, Llama).

``transformer_config_from_hf`` maps the HF architecture to a `TransformerConfig` with RL
defaults; ``build_model`` builds this rank's pipeline chunk(s); ``wrap_ddp`` wraps them in
megatron's DDP with the gradient contract of ``megarl.megatron.loss`` (sum, never average).

RL defaults for MoE (why): no load-balancing or z-loss (they would bias the policy gradient
and change the objective), router logits in fp32 (top-k ties and small probability changes
decide routing), no router fusion (the fused top-k path skips routing replay), dropless
routing, and ``moe_enable_routing_replay`` when rollout routing replay (R3) is configured.

Routing equivalence: HF ``norm_topk_prob=True`` (softmax over all experts, top-k, renormalise)
equals megatron's top-k over logits then softmax over the k (``moe_router_pre_softmax=False``);
``norm_topk_prob=False`` equals ``moe_router_pre_softmax=True`` (softmax, top-k, no renorm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig

from megarl.convert.mapping import SUPPORTED, Architecture
from megarl.errors import ConfigError
from megarl.layout import ParallelConfig
from megarl.megatron.experts import with_grouped_experts
from megarl.megatron.parallel import megatron_sizes

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def transformer_engine_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


@dataclass(frozen=True)
class ModelArchitecture:
    """What GPTModel needs besides the TransformerConfig."""

    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    rope_scaling_factor: float | None  # llama3-style rope scaling, None when absent
    tie_word_embeddings: bool


def _rope(hf: Mapping[str, Any]) -> tuple[float, float | None]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        return float(theta), float(rope.get("factor", 8.0))
    raise ConfigError(
        "model.hf_config.rope_parameters.rope_type", kind, "supported: default, llama3"
    )


def architecture(hf: Mapping[str, Any]) -> ModelArchitecture:
    theta, factor = _rope(hf)
    return ModelArchitecture(
        vocab_size=int(hf["vocab_size"]),
        max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def transformer_config_from_hf(
    hf: Mapping[str, Any],
    parallel: ParallelConfig,
    *,
    dtype: str = "bfloat16",
    routing_replay: bool = False,
    recompute: str = "none",
    use_transformer_engine: bool | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The `TransformerConfig` of an HF config (a dict of ``config.json``)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            "model.hf_config.model_type", model_type, f"supported: {', '.join(SUPPORTED)}"
        )
    architecture(hf)  # validates the rope and vocabulary fields GPTModel will need
    arch = Architecture.from_hf(hf)  # the numbers the weight map uses too
    if arch.o_bias:
        raise ConfigError(
            "model.hf_config.attention_bias", True, f"{model_type} with attention_bias puts a "
            "bias on o_proj, which megatron cannot hold without MLP biases; not supported"
        )
    if hf.get("use_sliding_window"):
        raise ConfigError(
            "model.hf_config.use_sliding_window", True, "sliding-window attention is not "
            "supported; set it to false (Qwen2 checkpoints ship it off)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("model.hf_config.hidden_act", hf.get("hidden_act"), "supported: silu")
    if dtype not in _DTYPES:
        raise ConfigError("model.dtype", dtype, f"must be one of {', '.join(_DTYPES)}")
    use_te = (
        transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    )
    if use_te and not transformer_engine_available():
        raise ConfigError(
            "model.transformer_engine", True, "transformer-engine is not installed: "
            "pip install 'megarl[te]'"
        )
    if parallel.cp > 1 and not use_te:
        raise ConfigError(
            "parallel.cp", parallel.cp, "context parallelism needs transformer-engine attention: "
            "pip install 'megarl[te]' (or set parallel.cp=1)"
        )
    params_dtype = _DTYPES[dtype]
    moe: dict[str, Any] = {}
    if arch.num_experts > 0:
        moe = dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.topk,
            moe_ffn_hidden_size=arch.moe_ffn,
            moe_layer_freq=[int(moe) for moe in arch.moe_layers],
            moe_router_pre_softmax=not bool(hf.get("norm_topk_prob", True)),
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_z_loss_coeff=None,
            moe_router_dtype="fp32",
            moe_router_fusion=False,
            moe_grouped_gemm=use_te,
            moe_permute_fusion=False,
            moe_enable_routing_replay=routing_replay,
        )
    recompute_args: dict[str, Any] = {}
    if recompute == "full":
        recompute_args = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif recompute == "selective":
        recompute_args = dict(recompute_granularity="selective")
    on_gpu = torch.cuda.is_available()
    fused = use_te and on_gpu
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden,
        num_attention_heads=arch.heads,
        num_query_groups=arch.groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn or 4 * arch.hidden,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype is torch.bfloat16,
        fp16=params_dtype is torch.float16,
        use_cpu_initialization=not on_gpu,
        **megatron_sizes(parallel),
        sequence_parallel=parallel.use_sequence_parallel,
        calculate_per_token_loss=True,  # see megarl/megatron/loss.py: the schedule must not scale
        # packed micro-batches differ in length; megatron's interleaved (VPP) schedule deadlocks
        # exchanging variable shapes, so with VPP rows are padded to one length instead
        variable_seq_lengths=(parallel.vpp or 1) == 1,
        # batched p2p posts the activation and the gradient to the same peer of a two-stage
        # ring in an order that can pair them crosswise (same shape, no error): in the
        # interleaved schedule's steady state (more micro-batches than pp) gradients came out
        # wrong. Unbatched p2p orders even and odd ranks and uses a second communicator.
        batch_p2p_comm=(parallel.vpp or 1) == 1,
        moe_token_dispatcher_type="alltoall",  # megatron rejects allgather with variable lengths
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=fused,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **moe,
        **recompute_args,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def use_grouped_experts(grouped_experts: bool | None, use_te: bool) -> bool:
    """Whether MoE layers get `GroupedGemmExperts` (megarl/megatron/experts.py) instead of
    megatron's SequentialMLP: by default whenever the TE spec (with TE's own grouped experts)
    is not used."""
    if grouped_experts is None:
        return not use_te
    if grouped_experts and use_te:
        raise ConfigError(
            "model.grouped_experts", True, "is for the local spec; the Transformer-Engine spec "
            "has its own grouped experts (set model.transformer_engine=false to use these)"
        )
    return grouped_experts


def build_model(
    config: TransformerConfig,
    hf: Mapping[str, Any],
    *,
    use_transformer_engine: bool | None = None,
    grouped_experts: bool | None = None,
) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without VPP).

    ``grouped_experts`` (None: on without TE): the routed experts of the local spec as two
    grouped GEMMs (`megarl.megatron.experts.GroupedGemmExperts`) instead of SequentialMLP's
    loop; the same weights, numerics and checkpoints."""
    use_te = (
        transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    )
    grouped = use_grouped_experts(grouped_experts, use_te) and bool(config.num_moe_experts)
    arch = architecture(hf)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=stage
        )
        if grouped:
            spec = with_grouped_experts(spec)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rotary_base),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def wrap_ddp(
    chunks: list[GPTModel], config: TransformerConfig, *, distributed_optimizer: bool = True
) -> list[DistributedDataParallel]:
    """Megatron DDP with grads SUMMED over DP x CP and expert-DP (``average_in_collective``
    off, ``calculate_per_token_loss`` on): each micro-batch's loss is already its share of the
    global loss, so averaging would divide by the number of ranks a second time."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
    for model in wrapped:
        model.broadcast_params()
    return wrapped
