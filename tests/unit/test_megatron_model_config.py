"""HF config -> megatron TransformerConfig, and layout validation against the model."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from megarl.convert.mapping import Architecture
from megarl.errors import ConfigError
from megarl.layout import ModelFacts, ParallelConfig
from megarl.megatron.model import architecture, transformer_config_from_hf
from megarl.megatron.parallel import check_layout

# Qwen3-30B-A3B's config.json (the fields that shape the model)
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "attention_bias": False,
    "hidden_act": "silu", "initializer_range": 0.02,
}  # fmt: skip
QWEN3_DENSE = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": True, "hidden_act": "silu",
}  # fmt: skip
LLAMA = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0},
    "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip


def test_qwen3_30b_a3b_exact_shape_and_rl_moe_defaults() -> None:
    cfg = transformer_config_from_hf(QWEN3_30B_A3B, ParallelConfig(tp=4, ep=8, pp=2),
                                     routing_replay=True, use_transformer_engine=False)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (48, 2048, 32)
    assert (cfg.num_query_groups, cfg.kv_channels) == (4, 128)  # kv_channels != 2048 / 32
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (128, 8, 768)
    assert cfg.moe_layer_freq == [1] * 48
    assert cfg.qk_layernorm and cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu and not cfg.add_bias_linear
    # HF norm_topk_prob=True == top-k over logits then softmax over the k
    assert cfg.moe_router_pre_softmax is False and cfg.moe_router_score_function == "softmax"
    assert cfg.moe_router_load_balancing_type == "none" and cfg.moe_aux_loss_coeff == 0.0
    assert cfg.moe_router_dtype == "fp32" and not cfg.moe_router_fusion
    assert cfg.moe_enable_routing_replay
    assert cfg.sequence_parallel and cfg.calculate_per_token_loss and cfg.bf16
    assert (cfg.tensor_model_parallel_size, cfg.expert_model_parallel_size) == (4, 8)
    arch = architecture(QWEN3_30B_A3B)
    assert (arch.vocab_size, arch.rotary_base, arch.tie_word_embeddings) == (151936, 1e6, False)
    off = transformer_config_from_hf(QWEN3_30B_A3B, ParallelConfig(), routing_replay=False,
                                     use_transformer_engine=False)
    assert not off.moe_enable_routing_replay


def test_norm_topk_false_and_sparse_steps_map_to_megatron() -> None:
    hf = {**QWEN3_30B_A3B, "num_hidden_layers": 6, "norm_topk_prob": False,
          "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    assert [int(m) for m in Architecture.from_hf(hf).moe_layers] == [0, 0, 0, 1, 0, 1]
    cfg = transformer_config_from_hf(hf, ParallelConfig(), use_transformer_engine=False)
    assert cfg.moe_router_pre_softmax is True and cfg.moe_layer_freq == [0, 0, 0, 1, 0, 1]


def test_dense_qwen3_and_llama() -> None:
    q = transformer_config_from_hf(QWEN3_DENSE, ParallelConfig(tp=2), dtype="float32",
                                   use_transformer_engine=False)
    assert q.num_moe_experts is None and q.qk_layernorm and q.kv_channels == 128
    assert q.ffn_hidden_size == 3072 and not q.bf16
    assert architecture(QWEN3_DENSE).tie_word_embeddings
    llama = transformer_config_from_hf(LLAMA, ParallelConfig(), use_transformer_engine=False)
    assert not llama.qk_layernorm and llama.kv_channels == 64 and llama.layernorm_epsilon == 1e-5
    arch = architecture(LLAMA)
    assert (arch.rotary_base, arch.rope_scaling_factor) == (500000.0, 32.0)


def test_qwen2_has_qkv_biases_and_no_qk_norm() -> None:
    """DeepSeek-R1-Distill-Qwen (the DGPO and BAPO papers' models) are Qwen2."""
    qwen2 = {**LLAMA, "model_type": "qwen2", "rope_scaling": None, "rope_theta": 10000.0,
             "use_sliding_window": False}
    qwen2.pop("attention_bias")
    cfg = transformer_config_from_hf(qwen2, ParallelConfig(), use_transformer_engine=False)
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and not cfg.qk_layernorm


@pytest.mark.parametrize(
    ("hf", "parallel", "kwargs", "field"),
    [
        ({**LLAMA, "attention_bias": True}, ParallelConfig(), {},
         "model.hf_config.attention_bias"),
        ({**QWEN3_DENSE, "model_type": "qwen2", "use_sliding_window": True}, ParallelConfig(),
         {}, "model.hf_config.use_sliding_window"),
        ({**QWEN3_30B_A3B, "model_type": "mixtral"}, ParallelConfig(), {},
         "model.hf_config.model_type"),
        ({**QWEN3_30B_A3B, "hidden_act": "gelu"}, ParallelConfig(), {},
         "model.hf_config.hidden_act"),
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn"}}, ParallelConfig(), {},
         "model.hf_config.rope_parameters.rope_type"),
        (QWEN3_30B_A3B, ParallelConfig(cp=2), {"use_transformer_engine": False}, "parallel.cp"),
        (QWEN3_30B_A3B, ParallelConfig(), {"dtype": "int8"}, "model.dtype"),
    ],
)
def test_unsupported_model_is_a_one_line_config_error(hf, parallel, kwargs, field) -> None:
    kwargs = {"use_transformer_engine": False, **kwargs}
    with pytest.raises(ConfigError) as info:
        transformer_config_from_hf(hf, parallel, **kwargs)
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("parallel", "world", "field", "says"),
    [
        (ParallelConfig(tp=8), 8, "parallel.tp", "4 KV heads"),  # TP <= 4 for Qwen3-30B-A3B
        (ParallelConfig(ep=3), 3, "parallel.ep", "128 experts"),
        (ParallelConfig(pp=5), 5, "parallel.pp", "48 layers"),
        (ParallelConfig(tp=2, pp=2), 6, "parallel.world_size", "multiple of tp*pp*cp"),
        (ParallelConfig(tp=2, dp=2), 8, "parallel.dp", "must equal the world size 8"),
        (ParallelConfig(tp=2, sequence_parallel=False), 2, "parallel.sequence_parallel",
         "MoE"),
        (ParallelConfig(ep=16), 8, "parallel.ep", "must divide tp*cp*dp"),
    ],
)
def test_layout_is_validated_against_world_and_model(parallel, world, field, says) -> None:
    with pytest.raises(ConfigError) as info:
        check_layout(parallel, ModelFacts.from_hf(QWEN3_30B_A3B), world)
    message = str(info.value)
    assert message.startswith(field) and says in message and "\n" not in message


def test_valid_layout_resolves_data_parallel_size() -> None:
    resolved = check_layout(ParallelConfig(tp=4, pp=2, ep=8), ModelFacts.from_hf(QWEN3_30B_A3B),
                            64)
    assert resolved.dp == 8 and resolved.use_sequence_parallel
    facts = ModelFacts.from_hf({**QWEN3_30B_A3B, "vocab_size": 151935})
    with pytest.raises(ConfigError, match="vocabulary size 151935"):
        check_layout(ParallelConfig(tp=2), facts, 2)
