"""The HF config fields megarl reads, checked before anything is built.

``model.hf_config`` is free-form YAML: the whole ``config.json`` of a model built from scratch,
or keys that update a checkpoint's. `check_hf_config` checks the merged config (checkpoint
``config.json`` updated by the inline keys) for every field megarl reads — in
``convert/mapping.py``, ``megatron/model.py``, ``memory_model.py`` and the rollout engines — its
type, its range and how it divides the others, and refuses an inline key that none of the
supported architectures' transformers config classes knows (``num_expert`` is a typo of
``num_experts``, not a new field), with the closest known key.

Pure Python (no torch, no transformers import): ``Config.validate`` runs it on every load.
``tests/unit/test_config_checks.py`` checks `HF_KEYS` against transformers' config classes, so
a transformers upgrade that adds a key fails a test instead of being refused here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from megarl.errors import ConfigError, Short

FIELD = "model.hf_config"

# The architectures megarl maps HF <-> Megatron (convert/mapping.py re-exports this).
SUPPORTED = ("qwen3_moe", "qwen3", "qwen2", "llama")
DENSE = ("qwen3", "qwen2", "llama")

# Keys that transformers 5's config classes for SUPPORTED accept: their __init__ parameters,
# attribute_map and to_dict() keys (Qwen3MoeConfig, Qwen3Config, Qwen2Config, LlamaConfig).
_TRANSFORMERS_KEYS = frozenset({
    # every one of the four (PreTrainedConfig's own and the shared decoder fields)
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id",
    "chunk_size_feed_forward", "dtype", "eos_token_id", "hidden_act", "hidden_size", "id2label",
    "initializer_range", "intermediate_size", "is_encoder_decoder", "label2id",
    "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "output_attentions", "output_hidden_states", "pad_token_id",
    "problem_type", "return_dict", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
    "transformers_version", "use_cache", "vocab_size",
    # qwen3_moe
    "attention_bias", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
    "norm_topk_prob", "num_experts", "num_experts_per_tok", "num_local_experts",
    "output_router_logits", "router_aux_loss_coef", "sliding_window", "use_sliding_window",
    # qwen3, qwen2
    "head_dim", "layer_types", "max_window_layers",
    # llama
    "mlp_bias", "pretraining_tp",
})
# Keys of released checkpoints' config.json that transformers still reads (and converts).
_LEGACY_KEYS = frozenset({"rope_theta", "rope_scaling", "torch_dtype"})
HF_KEYS = _TRANSFORMERS_KEYS | _LEGACY_KEYS

# What megarl reads, by kind.
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
    "max_position_embeddings", "num_experts_per_tok", "decoder_sparse_step",
)
_COUNTS = ("num_experts", "num_local_experts")  # 0 = dense
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_NON_NEGATIVE_FLOATS = ("initializer_range",)
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_sliding_window")
# A whole config (a model built from scratch, a checkpoint's config.json) must give these.
_REQUIRED = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
             "num_attention_heads")
_ROPE_TYPES = (None, "default", "llama3")


EXPERT_COUNT_KEYS = _COUNTS  # transformers 5 writes num_local_experts for some models


def num_experts_of(hf: Mapping[str, Any]) -> int | None:
    """Routed experts (0: dense; ``num_experts``, else ``num_local_experts``, which transformers
    5 writes for some models); None when the config names neither. The one reader of the
    expert count: layout, conversion, planning and the model all use it."""
    values = [hf[k] for k in EXPERT_COUNT_KEYS if hf.get(k) is not None]
    if not values:
        return None
    return int(next((v for v in values if v), 0))


def router_topk_of(hf: Mapping[str, Any]) -> int:
    """Experts per token (0 for a dense model): the one reader of ``num_experts_per_tok``."""
    return int(hf.get("num_experts_per_tok") or 0) if num_experts_of(hf) else 0


def check_hf_config(hf: Mapping[str, Any], inline: Mapping[str, Any] | None = None, *,
                    complete: bool = False) -> None:
    """Raise a one-line `ConfigError` for the first field of ``hf`` megarl cannot build from.

    ``hf`` is the merged config, ``inline`` the keys the YAML gave (only those are checked
    against `HF_KEYS`), ``complete`` whether ``hf`` is a whole config (then the size fields
    are required) rather than a few overrides of a checkpoint not available here.
    """
    for key, value in (inline or {}).items():
        if key not in HF_KEYS:
            match = difflib.get_close_matches(key, sorted(HF_KEYS), n=1, cutoff=0.6)
            hint = f" (did you mean '{FIELD}.{match[0]}'?)" if match else ""
            raise ConfigError(f"{FIELD}.{key}", Short(value),
                              f"not a field of the {', '.join(SUPPORTED)} HF configs{hint}")
    given = {k: v for k, v in hf.items() if v is not None}  # null = transformers' default
    _check_types(given)
    model_type = given.get("model_type")
    if model_type is not None and model_type not in SUPPORTED:
        raise ConfigError(f"{FIELD}.model_type", model_type, f"supported: {', '.join(SUPPORTED)}")
    if complete:
        for key in _REQUIRED:
            if key not in given:
                raise ConfigError(f"{FIELD}.{key}", None, "required: the model's config gives "
                                  "no value (set it in model.hf_config)")
    _check_shapes(given)
    _check_experts(given)
    _check_supported(given)


def _check_types(hf: Mapping[str, Any]) -> None:
    for key in _POSITIVE_INTS:
        if key in hf and not (_is_int(hf[key]) and hf[key] >= 1):
            raise ConfigError(f"{FIELD}.{key}", hf[key], "must be an int >= 1")
    for key in _COUNTS:
        if key in hf and not (_is_int(hf[key]) and hf[key] >= 0):
            raise ConfigError(f"{FIELD}.{key}", hf[key], "must be an int >= 0 (0 = dense)")
    for key in _POSITIVE_FLOATS:
        if key in hf and not (_is_number(hf[key]) and hf[key] > 0):
            raise ConfigError(f"{FIELD}.{key}", hf[key], "must be a finite number > 0")
    for key in _NON_NEGATIVE_FLOATS:
        if key in hf and not (_is_number(hf[key]) and hf[key] >= 0):
            raise ConfigError(f"{FIELD}.{key}", hf[key], "must be a finite number >= 0")
    for key in _BOOLS:
        if key in hf and not isinstance(hf[key], bool):
            raise ConfigError(f"{FIELD}.{key}", hf[key], "must be true or false")
    for key in ("model_type", "hidden_act"):
        if key in hf and not isinstance(hf[key], str):
            raise ConfigError(f"{FIELD}.{key}", Short(hf[key]), "must be a string")
    architectures = hf.get("architectures", [])
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{FIELD}.architectures", Short(architectures),
                          "must be a list of class names, e.g. [Qwen3MoeForCausalLM]")
    for key in ("rope_parameters", "rope_scaling"):
        if key in hf:
            _check_rope(key, hf[key])


def _check_rope(key: str, rope: Any) -> None:
    if not isinstance(rope, Mapping):
        raise ConfigError(f"{FIELD}.{key}", Short(rope), "must be a mapping (or null)")
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{FIELD}.{key}.rope_type", kind, "supported: default, llama3")
    for name in ("rope_theta", "factor"):
        value = rope.get(name)
        if value is not None and not (_is_number(value) and value > 0):
            raise ConfigError(f"{FIELD}.{key}.{name}", value, "must be a finite number > 0")


def _check_shapes(hf: Mapping[str, Any]) -> None:
    heads, groups = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if heads is not None and groups is not None and heads % groups:
        raise ConfigError(f"{FIELD}.num_key_value_heads", groups,
                          f"must divide num_attention_heads={heads}")
    hidden = hf.get("hidden_size")
    if heads is not None and hidden is not None and "head_dim" not in hf and hidden % heads:
        raise ConfigError(f"{FIELD}.num_attention_heads", heads,
                          f"must divide hidden_size={hidden} (or give head_dim)")
    layers = hf.get("num_hidden_layers")
    dense = hf.get("mlp_only_layers", [])
    if not (isinstance(dense, list) and all(_is_int(i) for i in dense)):
        raise ConfigError(f"{FIELD}.mlp_only_layers", Short(dense),
                          "must be a list of layer indices")
    if layers is not None and any(not 0 <= i < layers for i in dense):
        raise ConfigError(f"{FIELD}.mlp_only_layers", Short(dense),
                          f"layer indices must be in [0, num_hidden_layers={layers})")


def _check_experts(hf: Mapping[str, Any]) -> None:
    key = "num_experts" if hf.get("num_experts") else "num_local_experts"
    experts = num_experts_of(hf) or 0
    if not experts:
        return
    model_type = hf.get("model_type")
    if model_type in DENSE:
        raise ConfigError(f"{FIELD}.{key}", experts, f"{model_type} is a dense architecture: "
                          "use model_type qwen3_moe for experts, or set it to null")
    topk = hf.get("num_experts_per_tok")
    if topk is None:
        raise ConfigError(f"{FIELD}.num_experts_per_tok", None,
                          f"required with {key}={experts}: the experts each token is routed to")
    if topk > experts:
        raise ConfigError(f"{FIELD}.num_experts_per_tok", topk, f"must be <= {key}={experts}")
    if "moe_intermediate_size" not in hf:
        raise ConfigError(f"{FIELD}.moe_intermediate_size", None,
                          f"required with {key}={experts}: the experts' FFN size")


def _check_supported(hf: Mapping[str, Any]) -> None:
    """What megatron's GPT layers cannot hold (megatron/model.py refuses them again at build)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{FIELD}.hidden_act", hf["hidden_act"], "supported: silu")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{FIELD}.use_sliding_window", True, "sliding-window attention is "
                          "not supported; set it to false (Qwen2 checkpoints ship it off)")
    if hf.get("attention_bias") and hf.get("model_type") not in (None, "qwen2"):
        raise ConfigError(f"{FIELD}.attention_bias", True, f"{hf['model_type']} with "
                          "attention_bias puts a bias on o_proj, which megatron cannot hold "
                          "without MLP biases; not supported")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
