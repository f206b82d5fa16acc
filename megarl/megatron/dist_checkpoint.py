"""Live distributed checkpoints: a model (and its optimizer) in megatron's ``torch_dist`` format.

One format, written by the trainer (`Policy.save`) and read and written by the offline
converters (`megarl.megatron.hf_conversion`): every tensor stored once by GLOBAL key, shape and
offset, so a checkpoint from any TP/PP/EP/ETP layout loads into any other. Keys are
*canonical*: linear-layer ``_extra_state`` objects (FP8 metadata; empty in bf16) are left out,
so a checkpoint loads into both the local and the Transformer-Engine model spec, and a MoE
layer's pre-MLP norm is stored under TE's ``pre_mlp_layernorm.weight`` (the local spec names it
``mlp.linear_fc1.layer_norm_weight``), which is what Megatron-LM's own Qwen3-MoE checkpoints
use. ``hf/`` beside the tensors holds the model's ``config.json`` (and tokenizer files), so a
training checkpoint converts to HF with no other input.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from torch import Tensor

from megarl.convert.hf_io import ConversionError, copy_tokenizer_files
from megarl.convert.mapping import Architecture
from megarl.layout import ParallelConfig

HF_FILES = "hf"  # config.json + tokenizer files of the model, inside the checkpoint
_MOE_NORM = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.linear_fc1\.layer_norm_weight$")
# one canonical tensor per parameter, so the optimizer state loads into any DP size
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def canonical_keys(
    sharded: Mapping[str, Any], arch: Architecture, *, te_norm_key: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The sharded state dict without ``_extra_state`` objects and with TE's MoE norm key
    (``te_norm_key=False`` keeps the local spec's key: checkpoints written before the keys
    were canonical)."""
    out: dict[str, Any] = {}
    for name, item in sharded.items():
        if isinstance(item, ShardedObject) or name.endswith("._extra_state"):
            continue
        if isinstance(item, Mapping):
            out[name] = canonical_keys(item, arch, te_norm_key=te_norm_key)
            continue
        match = _MOE_NORM.match(item.key)
        if te_norm_key and match and arch.moe_layers[int(match.group(1))]:
            item = dataclasses.replace(
                item, key=f"decoder.layers.{match.group(1)}.pre_mlp_layernorm.weight"
            )
        out[name] = item
    return out


def checkpoint_state(
    models: list[Any], arch: Architecture, optimizer: Any = None, *,
    is_loading: bool = False, te_norm_key: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``{"model{i}": chunk i, "optimizer": ...}`` under canonical keys (the optimizer's keys
    follow its parameters' keys)."""
    chunks = [m.module if hasattr(m, "module") else m for m in models]
    model = {f"model{i}": canonical_keys(c.sharded_state_dict(), arch, te_norm_key=te_norm_key)
             for i, c in enumerate(chunks)}
    if optimizer is None:
        return model
    state = optimizer.sharded_state_dict(model if len(chunks) > 1 else model["model0"],
                                         is_loading=is_loading, metadata=_OPTIMIZER_FORMAT)
    return {**model, "optimizer": state}


@contextmanager
def in_process_writer() -> Iterator[None]:
    """megatron's synchronous `dist_checkpointing.save` without a helper process.

    Its filesystem writer collects the write results in a queue from a ``multiprocessing``
    Manager, a server process started (with a resource tracker) on the first save and kept for
    the life of the trainer; a trainer killed on its own (SIGKILL, OOM killer) leaves both
    running. A synchronous save writes in this process, so a plain queue is all it needs.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def save_distributed(
    directory: str | Path, models: list[Any], hf_config: Mapping[str, Any], *,
    optimizer: Any = None, tokenizer_from: str | Path | None = None,
) -> None:  # fmt: skip
    """Write the model (and optimizer) from any layout into `directory` (collective; the
    caller makes it atomic: the run's checkpoints are renamed into place whole)."""
    out = Path(directory).expanduser()
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = checkpoint_state(models, Architecture.from_hf(hf_config), optimizer)
    with in_process_writer():
        dist_checkpointing.save(state, str(out))
    if dist.get_rank() == 0:
        write_hf_files(out, hf_config, None if tokenizer_from is None else Path(tokenizer_from))
    dist.barrier()


def load_distributed(
    directory: str | Path, models: list[Any], hf_config: Mapping[str, Any], *,
    optimizer: Any = None,
) -> None:  # fmt: skip
    """Load a checkpoint (from any layout, or converted from HF) into the model chunks and, when
    given, the optimizer."""
    path = str(Path(directory).expanduser())
    stored = dist_checkpointing.load_tensors_metadata(path)
    te_norm_key = not any(_MOE_NORM.match(key) for key in stored)
    arch = Architecture.from_hf(hf_config)
    if optimizer is not None:
        # a fresh Adam has no state to load into: create it (a zero-gradient step, overwritten
        # by the checkpoint below), as megatron's own loader does for megatron-fsdp
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()
    state = checkpoint_state(models, arch, optimizer, is_loading=True, te_norm_key=te_norm_key)
    for i in range(len(models)):
        check_stored(state[f"model{i}"], stored, path)
    loaded = dist_checkpointing.load(state, path)
    for i, model in enumerate(models):
        inner = model.module if hasattr(model, "module") else model
        result = inner.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if missing or result.unexpected_keys:
            raise ConversionError(f"{path}: parameters not loaded {missing[:4]}, "
                                  f"unexpected {result.unexpected_keys[:4]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


def pieces(item: ShardedTensor | ShardedTensorFactory, data: Tensor) -> list[ShardedTensor]:
    """The ShardedTensors a parameter is saved as (a factory splits gate / up)."""
    if isinstance(item, ShardedTensor):
        return [dataclasses.replace(item, data=data)]
    built = item.build_fn(item.key, data, item.replica_id, item.flattened_range)
    flat = list(built.values()) if isinstance(built, Mapping) else list(built)
    if not all(isinstance(p, ShardedTensor) for p in flat):
        raise ConversionError(f"{item.key}: unexpected nested factory output")
    return flat


def check_stored(structure: Mapping[str, Any], stored: Mapping[str, Any], path: str) -> None:
    """Every tensor the model needs is in the checkpoint with its global shape, by key."""
    for item in structure.values():
        for piece in pieces(item, item.data):
            have = stored.get(piece.key)
            if have is None:
                raise ConversionError(f"{path}: checkpoint is missing tensor {piece.key}")
            if tuple(have.global_shape) != tuple(piece.global_shape):
                raise ConversionError(
                    f"{path}: tensor {piece.key} has shape {tuple(have.global_shape)}, the "
                    f"model needs {tuple(piece.global_shape)} (a different model config?)"
                )


def write_hf_files(
    ckpt_dir: Path, hf_config: Mapping[str, Any], tokenizer_from: Path | None,
    target: ParallelConfig | None = None,
) -> None:  # fmt: skip
    """``hf/config.json`` (and tokenizer files; the layout a conversion targeted) beside the
    tensors."""
    hf_dir = ckpt_dir / HF_FILES
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, hf_dir)
    if target is not None:
        layout = {k: getattr(target, k) for k in ("tp", "pp", "ep", "expert_tp", "cp")}
        (ckpt_dir / "megarl_target_layout.json").write_text(json.dumps(layout, indent=2))


def read_hf_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The HF config stored in a megarl distributed checkpoint."""
    path = Path(ckpt_dir).expanduser()
    if not (path / "metadata.json").is_file():
        raise ConversionError(f"{path}: not a megatron distributed checkpoint (no metadata.json)")
    config = path / HF_FILES / "config.json"
    if not config.is_file():
        raise ConversionError(
            f"{path}: no {HF_FILES}/config.json (pass --hf-config DIR with the model's config)"
        )
    return json.loads(config.read_text())
