"""The one HF <-> Megatron parameter map (Qwen3-MoE, Qwen3, Qwen2, Llama), pure torch.

Names on the Megatron side are GLOBAL: the names of a single-rank (TP1/PP1/EP1) GPTModel, with
global layer and expert indices. `megarl.convert.sharding` turns them into a rank's local names
and shards. Two naming schemes are supported, as megatron-core builds them:

- ``local`` spec (no Transformer-Engine): separate ``input_layernorm`` / ``pre_mlp_layernorm``,
  experts as ``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight`` (SequentialMLP);
- ``te`` spec: norms fused into the following linear (``linear_qkv.layer_norm_weight``,
  dense ``mlp.linear_fc1.layer_norm_weight``; MoE layers keep ``pre_mlp_layernorm``), grouped
  experts as ``mlp.experts.linear_fc{1,2}.weight{j}``.

Tensor transforms: ``linear_qkv`` is ``[q_g, k_g, v_g]`` interleaved per query group (so TP can
split whole groups); ``linear_fc1`` is ``[gate; up]``. HF names are the on-disk ones
(per-expert ``mlp.experts.{j}.{gate,up,down}_proj.weight``), which transformers and vLLM load.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from megarl.errors import UserError
from megarl.hf_checks import SUPPORTED  # the architectures mapped here
from megarl.layout import ModelFacts  # the one reader of the fields layout and conversion share

Scheme = Literal["local", "te"]
Kind = Literal["copy", "qkv", "gated"]


class ConversionError(UserError):
    """A tensor that is unmapped, missing, duplicated or of the wrong shape."""




@dataclass(frozen=True)
class Architecture:
    """The numbers of an HF config that decide names and shapes."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    ffn: int
    moe_ffn: int
    num_experts: int
    topk: int  # experts per token (0 for dense)
    moe_layers: tuple[bool, ...]
    tie_embeddings: bool
    qk_norm: bool
    qkv_bias: bool  # biases on q, k, v (Qwen2 always; Qwen3 / Llama with attention_bias)
    o_bias: bool  # a bias on o_proj (Qwen3 / Llama attention_bias; megatron cannot hold it alone)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Architecture:
        """The fields layout and conversion share are read once, by `ModelFacts.from_hf`; the
        rest (head size, FFN sizes, which layers are MoE, ties and biases) only matter here."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED:
            raise ConversionError(
                f"config.json model_type={model_type!r}: supported are {', '.join(SUPPORTED)}"
            )
        facts = ModelFacts.from_hf(hf)

        def required(value: int | None, key: str) -> int:
            if value is None:
                raise ConversionError(f"config.json has no integer {key}")
            return value

        layers = required(facts.num_layers, "num_hidden_layers")
        heads = required(facts.num_attention_heads, "num_attention_heads")
        hidden = required(facts.hidden_size, "hidden_size")
        experts = facts.num_experts or 0
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        moe = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers))
        return cls(
            model_type=model_type,
            num_layers=layers,
            hidden=hidden,
            heads=heads,
            groups=required(facts.num_query_groups, "num_key_value_heads"),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            vocab=required(facts.vocab_size, "vocab_size"),
            ffn=int(hf.get("intermediate_size") or 0),
            moe_ffn=int(hf.get("moe_intermediate_size") or 0),
            num_experts=experts,
            topk=facts.moe_router_topk or 0,
            moe_layers=moe,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        )

    def check_convertible(self) -> None:
        """Raise for an architecture megatron's GPT layers cannot hold exactly."""
        if self.o_bias:
            raise ConversionError(
                f"config.json attention_bias=true ({self.model_type}): the bias it puts on "
                "o_proj has no megatron counterpart without biases on every MLP too; "
                "only Qwen2's q/k/v-only biases are supported"
            )


@dataclass(frozen=True)
class TensorMap:
    """One Megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    shape: tuple[int, ...]  # global Megatron shape
    layer: int | None = None  # global layer index (None: embeddings, final norm, output)
    expert: int | None = None  # global expert index

    def to_megatron(self, tensors: list[Tensor], arch: Architecture) -> Tensor:
        expected = self.to_hf(torch.empty(self.shape, device="meta"), arch)
        for name, tensor, want in zip(self.hf, tensors, expected, strict=True):
            if tuple(tensor.shape) != tuple(want.shape):
                raise ConversionError(
                    f"{name}: shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(want.shape)}"
                )
        if self.kind == "copy":
            out = tensors[0]
        elif self.kind == "gated":
            out = torch.cat(tensors, dim=0)
        else:
            q, k, v = tensors
            g = arch.groups
            out = torch.cat(
                [q.reshape(g, -1, *q.shape[1:]), k.reshape(g, -1, *k.shape[1:]),
                 v.reshape(g, -1, *v.shape[1:])], dim=1,
            ).reshape(-1, *q.shape[1:])  # fmt: skip
        if tuple(out.shape) != self.shape:
            raise ConversionError(
                f"{self.megatron}: built from {', '.join(self.hf)} has shape {tuple(out.shape)}, "
                f"expected {self.shape}"
            )
        return out

    def to_hf(self, tensor: Tensor, arch: Architecture) -> list[Tensor]:
        if tuple(tensor.shape) != self.shape:
            raise ConversionError(
                f"{self.megatron}: shape {tuple(tensor.shape)}, expected {self.shape}"
            )
        if self.kind == "copy":
            return [tensor]
        if self.kind == "gated":
            return list(tensor.chunk(2, dim=0))
        g, d = arch.groups, arch.head_dim
        per_group = tensor.reshape(g, -1, *tensor.shape[1:])
        q_rows = arch.heads // g * d
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        return [t.reshape(-1, *tensor.shape[1:]).contiguous() for t in (q, k, v)]


def tensor_maps(arch: Architecture, scheme: Scheme = "local") -> Iterator[TensorMap]:
    """Every Megatron tensor of the model in order (embeddings, layers, final norm, output)."""
    arch.check_convertible()
    h, d = arch.hidden, arch.head_dim
    yield TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy",
                    (arch.vocab, h))
    qkv_rows = (arch.heads + 2 * arch.groups) * d
    for i in range(arch.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if scheme == "te" else \
            "input_layernorm.weight"
        yield TensorMap(m + attn_norm, (p + "input_layernorm.weight",), "copy", (h,), i)
        qkv = tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")
        yield TensorMap(m + "self_attention.linear_qkv.weight", qkv, "qkv", (qkv_rows, h), i)
        if arch.qkv_bias:
            bias = tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")
            yield TensorMap(m + "self_attention.linear_qkv.bias", bias, "qkv", (qkv_rows,), i)
        yield TensorMap(m + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",),
                        "copy", (h, arch.heads * d), i)
        if arch.qk_norm:
            for x in "qk":
                yield TensorMap(m + f"self_attention.{x}_layernorm.weight",
                                (p + f"self_attn.{x}_norm.weight",), "copy", (d,), i)
        mlp_norm = (p + "post_attention_layernorm.weight",)
        if not arch.moe_layers[i]:
            norm = "mlp.linear_fc1.layer_norm_weight" if scheme == "te" else \
                "pre_mlp_layernorm.weight"
            yield TensorMap(m + norm, mlp_norm, "copy", (h,), i)
            yield TensorMap(m + "mlp.linear_fc1.weight",
                            (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "gated",
                            (2 * arch.ffn, h), i)
            yield TensorMap(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), "copy",
                            (h, arch.ffn), i)
            continue
        yield TensorMap(m + "pre_mlp_layernorm.weight", mlp_norm, "copy", (h,), i)
        yield TensorMap(m + "mlp.router.weight", (p + "mlp.gate.weight",), "copy",
                        (arch.num_experts, h), i)
        for j in range(arch.num_experts):
            e = p + f"mlp.experts.{j}."
            if scheme == "te":
                fc1, fc2 = f"mlp.experts.linear_fc1.weight{j}", f"mlp.experts.linear_fc2.weight{j}"
            else:
                fc1 = f"mlp.experts.local_experts.{j}.linear_fc1.weight"
                fc2 = f"mlp.experts.local_experts.{j}.linear_fc2.weight"
            yield TensorMap(m + fc1, (e + "gate_proj.weight", e + "up_proj.weight"), "gated",
                            (2 * arch.moe_ffn, h), i, j)
            yield TensorMap(m + fc2, (e + "down_proj.weight",), "copy", (h, arch.moe_ffn), i, j)
    yield TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", (h,))
    if not arch.tie_embeddings:
        yield TensorMap("output_layer.weight", ("lm_head.weight",), "copy", (arch.vocab, h))


def tied_output_map(arch: Architecture) -> TensorMap:
    """With tied embeddings and PP > 1, megatron's last stage keeps its own copy of the
    embedding as ``output_layer.weight`` (kept equal by megatron); it loads from the embedding
    and is never exported (the first stage's embedding is the source)."""
    return TensorMap("output_layer.weight", ("model.embed_tokens.weight",), "copy",
                     (arch.vocab, arch.hidden))


def hf_names(arch: Architecture) -> list[str]:
    """Every HF tensor name the architecture has (scheme-independent)."""
    return [name for tm in tensor_maps(arch) for name in tm.hf]


def check_hf_names(present: set[str] | list[str], arch: Architecture) -> None:
    """Fail, naming the tensors, when a checkpoint has missing or unexpected tensors."""
    present = {n for n in present if not n.endswith("rotary_emb.inv_freq")}  # old buffers
    if arch.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    expected = hf_names(arch)
    if len(expected) != len(set(expected)):  # a map bug, not a user error; never silent
        raise ConversionError("the HF name map lists a tensor twice")
    missing = [n for n in expected if n not in present]
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise ConversionError("checkpoint does not match config.json: " + "; ".join(parts))


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown
