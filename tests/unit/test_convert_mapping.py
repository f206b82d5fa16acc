"""The HF <-> Megatron name map, sharding rules and safetensors IO (pure torch, no megatron)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megarl.convert.hf_io import HFCheckpoint, HFCheckpointWriter
from megarl.convert.mapping import (
    Architecture,
    ConversionError,
    check_hf_names,
    tensor_maps,
)
from megarl.convert.sharding import local_name, owned, shard, unshard
from megarl.layout import RankCoordinates

TINY = {
    "qwen3_moe": {
        "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False,
    },
    "qwen3": {
        "model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "tie_word_embeddings": True,
    },
    "llama": {
        "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    },
}  # fmt: skip


def hf_model(model_type: str):
    import transformers

    config_cls = transformers.AutoConfig.for_model(**TINY[model_type])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls).float().eval()
    return model


@pytest.fixture(scope="module", params=sorted(TINY))
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path


@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("moe")
    hf_model("qwen3_moe").save_pretrained(path)
    return path


def on_disk(path: Path) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(path)
    return {n: ckpt.tensor(n) for n in ckpt.names()}


@pytest.mark.parametrize("scheme", ["local", "te"])
def test_hf_to_megatron_to_hf_is_bit_identical(saved, scheme: str) -> None:
    _, path = saved
    ckpt = HFCheckpoint(path)
    arch = Architecture.from_hf(ckpt.config)
    check_hf_names(ckpt.names(), arch)
    seen = []
    for tm in tensor_maps(arch, scheme):
        sources = [ckpt.tensor(n) for n in tm.hf]
        back = tm.to_hf(tm.to_megatron(sources, arch), arch)
        for name, a, b in zip(tm.hf, sources, back, strict=True):
            assert torch.equal(a, b), name
        seen += tm.hf
    assert sorted(seen) == sorted(n for n in ckpt.names() if n != "lm_head.weight"
                                  or not arch.tie_embeddings)


def test_qkv_is_interleaved_per_query_group() -> None:
    arch = Architecture.from_hf(TINY["qwen3_moe"])  # 8 heads, 2 groups, head_dim 8
    tm = next(t for t in tensor_maps(arch) if t.megatron.endswith("linear_qkv.weight"))
    q = torch.arange(64).float().view(64, 1).expand(64, 32)
    k = 1000 + torch.arange(16).float().view(16, 1).expand(16, 32)
    v = 2000 + torch.arange(16).float().view(16, 1).expand(16, 32)
    qkv = tm.to_megatron([q, k, v], arch)[:, 0]
    group0 = list(range(32)) + [1000 + i for i in range(8)] + [2000 + i for i in range(8)]
    assert qkv[:48].tolist() == group0  # [q of heads 0-3, k of group 0, v of group 0]
    assert qkv[48:56].tolist() == list(range(32, 40))


def test_shards_reassemble_for_every_tp_size() -> None:
    arch = Architecture.from_hf(TINY["qwen3_moe"])
    torch.manual_seed(1)
    for tm, size in itertools.product(tensor_maps(arch), (1, 2)):
        full = torch.randn(tm.shape)
        pieces = [shard(tm.megatron, full,
                        RankCoordinates(tp=size, tp_rank=r, etp=size, etp_rank=r))
                  for r in range(size)]
        assert torch.equal(unshard(tm.megatron, pieces), full), tm.megatron
    fc1 = next(t for t in tensor_maps(arch)
               if t.megatron.endswith("local_experts.0.linear_fc1.weight"))
    full = torch.arange(32).float().view(32, 1)  # [gate 0..15; up 16..31]
    rank1 = shard(fc1.megatron, full, RankCoordinates(etp=2, etp_rank=1))
    assert rank1[:, 0].tolist() == list(range(8, 16)) + list(range(24, 32))


def test_every_tensor_has_exactly_one_home_per_layout() -> None:
    arch = Architecture.from_hf({**TINY["qwen3_moe"], "num_hidden_layers": 4})
    for pp, vpp, ep in [(1, 1, 1), (2, 1, 2), (2, 2, 4)]:
        homes = {}
        for pp_rank, vp_stage, ep_rank in itertools.product(range(pp), range(vpp), range(ep)):
            at = RankCoordinates(pp=pp, pp_rank=pp_rank, vpp=vpp, vp_stage=vp_stage, ep=ep,
                             ep_rank=ep_rank)
            for tm in tensor_maps(arch):
                if owned(tm, arch.num_layers, arch.num_experts, at):
                    homes.setdefault(tm.megatron, set()).add((pp_rank, vp_stage, ep_rank))
                    name = local_name(tm, arch.num_layers, arch.num_experts, at)
                    layer = name.split(".")[2] if name.startswith("decoder.layers.") else "0"
                    assert int(layer) < arch.num_layers // (pp * vpp)
        for tm in tensor_maps(arch):
            stages = {(p, v) for p, v, _ in homes[tm.megatron]}
            assert len(stages) == 1, tm.megatron  # one pipeline chunk
            expected_ep = 1 if tm.expert is not None else ep  # experts: one EP rank
            assert len(homes[tm.megatron]) == expected_ep, tm.megatron
    at = RankCoordinates(pp=2, pp_rank=1, ep=4, ep_rank=3)
    tm = next(t for t in tensor_maps(arch, "te") if t.megatron.endswith("linear_fc2.weight7")
              and t.layer == 3)
    assert local_name(tm, 4, 8, at) == "decoder.layers.1.mlp.experts.linear_fc2.weight1"


def test_missing_or_renamed_expert_fails_naming_the_tensor(moe_saved, tmp_path: Path) -> None:
    path = moe_saved
    tensors = on_disk(path)
    arch = Architecture.from_hf(json.loads((path / "config.json").read_text()))
    gone = "model.layers.1.mlp.experts.5.up_proj.weight"
    with pytest.raises(ConversionError, match=f"missing {gone}"):
        check_hf_names([n for n in tensors if n != gone], arch)
    renamed = [n.replace("experts.5.", "experts.55.") for n in tensors]
    with pytest.raises(ConversionError) as info:
        check_hf_names(renamed, arch)
    assert "experts.5." in str(info.value) and "unexpected model.layers.0.mlp.experts.55" in \
        str(info.value)
    # the same through the reader: a checkpoint file without the tensor
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    save_file({n: t for n, t in tensors.items() if n != gone}, str(broken / "model.safetensors"))
    with pytest.raises(ConversionError, match="up_proj"):
        check_hf_names(HFCheckpoint(broken).names(), arch)


def test_writer_shards_atomically_and_transformers_loads_it(saved, tmp_path: Path) -> None:
    import transformers

    model_type, path = saved
    ckpt = HFCheckpoint(path)
    out = tmp_path / "out"
    with HFCheckpointWriter(out, ckpt.config, tokenizer_from=path, max_shard_bytes=20_000) as w:
        for name in ckpt.names():
            w.add(name, ckpt.tensor(name))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = hf_model(model_type)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.float()(ids).logits, original(ids).logits)
    # a failure inside the writer leaves nothing behind
    with pytest.raises(RuntimeError), HFCheckpointWriter(tmp_path / "half", ckpt.config) as w:
        w.add("x", torch.zeros(2))
        raise RuntimeError("boom")
    assert not (tmp_path / "half").exists()
    assert not list(tmp_path.glob(".half.tmp-*"))
    with pytest.raises(ConversionError, match="written twice"), \
            HFCheckpointWriter(tmp_path / "dup", ckpt.config) as w:
        w.add("x", torch.zeros(2))
        w.add("x", torch.zeros(2))


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a directory"):
        HFCheckpoint(tmp_path / "nope")
    with pytest.raises(ConversionError, match="no config.json"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        HFCheckpoint(tmp_path)
    with pytest.raises(ConversionError, match="model_type='mixtral'"):
        Architecture.from_hf({"model_type": "mixtral"})


def test_wrongly_shaped_or_duplicated_tensor_fails_naming_it(moe_saved, tmp_path: Path) -> None:
    tensors = on_disk(moe_saved)
    config = json.loads((moe_saved / "config.json").read_text())
    arch = Architecture.from_hf(config)
    bad = "model.layers.0.mlp.experts.3.gate_proj.weight"
    tensors[bad] = tensors[bad][:-1]  # one row short: gate and up no longer stack
    (tm,) = [tm for tm in tensor_maps(arch) if bad in tm.hf]
    with pytest.raises(ConversionError, match=f"{bad}: shape \\(15, 32\\), config.json implies "
                                              "\\(16, 32\\)"):
        tm.to_megatron([tensors[n] for n in tm.hf], arch)
    # the same tensor in two shard files (no index to disambiguate)
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "config.json").write_text(json.dumps(config))
    first = dict(itertools.islice(tensors.items(), 3))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(dup / "a.safetensors"))
    save_file({n: t.contiguous() for n, t in first.items()}, str(dup / "b.safetensors"))
    with pytest.raises(ConversionError, match="is in both a.safetensors and b.safetensors"):
        HFCheckpoint(dup)


def test_qwen2_maps_its_qkv_biases_and_attention_bias_on_o_proj_is_refused() -> None:
    arch = Architecture.from_hf(TINY["qwen2"])
    assert arch.qkv_bias and not arch.o_bias and not arch.qk_norm
    names = {n for tm in tensor_maps(arch) for n in tm.hf}
    assert "model.layers.1.self_attn.k_proj.bias" in names
    assert not any(n.endswith("o_proj.bias") for n in names)
    with_o_bias = Architecture.from_hf({**TINY["llama"], "attention_bias": True})
    assert with_o_bias.o_bias
    with pytest.raises(ConversionError, match="attention_bias=true.*o_proj"):
        list(tensor_maps(with_o_bias))
