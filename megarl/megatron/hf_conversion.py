"""Offline conversion between HF checkpoints and megatron distributed checkpoints, streaming, in
ONE process, without building the model (the format: `megarl.megatron.dist_checkpoint`).

Keys, global shapes, offsets and the gate/up split come from megatron itself (the
`sharded_state_dict()` of a single-rank model built on the meta device); data comes from the
one map of `megarl.convert`, one tensor at a time. Writing puts each layer in its own
``.distcp`` file (torch keeps a file's tensors until the file is closed), reading loads one
layer at a time, so either direction holds at most one layer's tensors plus the HF writer's one
bucket.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import queue
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

from megarl.convert.hf_io import (
    HFCheckpoint,
    HFCheckpointWriter,
    check_output_dir,
    dtype_of,
)
from megarl.convert.mapping import (
    Architecture,
    ConversionError,
    TensorMap,
    check_hf_names,
    tensor_maps,
)
from megarl.layout import ModelFacts, ParallelConfig
from megarl.megatron.dist_checkpoint import (
    HF_FILES,
    canonical_keys,
    check_stored,
    pieces,
    read_hf_config,
    write_hf_files,
)
from megarl.megatron.model import build_model, transformer_config_from_hf
from megarl.megatron.parallel import (
    check_layout,
    destroy_parallel,
    init_process_group,
    initialize_parallel,
)

BACKEND = ("torch_dist", 1)  # megatron's format name and version (metadata.json)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

Progress = Callable[[int, int], None]  # (done, total) tensors


# ---- the structure megatron gives a checkpoint ---------------------------------------------


@contextmanager
def single_rank(hf_config: Mapping[str, Any]) -> Iterator[None]:
    """A world of one with TP = PP = EP = 1: the offline converters run in one process."""
    init_process_group("gloo")
    if dist.get_world_size() != 1:
        raise ConversionError(
            "the offline converters run in one process: launch them with python, not torchrun"
        )
    initialize_parallel(ParallelConfig(), ModelFacts.from_hf(hf_config), seed=None)
    try:
        yield
    finally:
        destroy_parallel()


def meta_structure(hf_config: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``{global megatron name: ShardedTensor | ShardedTensorFactory}`` of the whole model.

    From a single-rank GPTModel on the meta device (no memory); needs `single_rank`.
    """
    arch = Architecture.from_hf(hf_config)
    config = transformer_config_from_hf(
        hf_config, ParallelConfig(), dtype=str(dtype).removeprefix("torch."),
        use_transformer_engine=False, perform_initialization=False,
        use_cpu_initialization=True,
        # structure only: the alltoall dispatcher opens a CUDA stream when built
        moe_token_dispatcher_type="allgather", variable_seq_lengths=False,
    )  # fmt: skip
    with torch.device("meta"):
        # SequentialMLP's structure: per-expert names, as the map has them (grouped experts
        # save the same tensors under the same keys: megarl/megatron/experts.py)
        (model,) = build_model(config, hf_config, use_transformer_engine=False,
                               grouped_experts=False)
    return canonical_keys(model.sharded_state_dict(), arch)


def _check_against_map(structure: Mapping[str, Any], maps: Mapping[str, TensorMap]) -> None:
    """Every model parameter has exactly one map entry and vice versa."""
    unmapped = sorted(set(structure) - set(maps))
    unused = sorted(set(maps) - set(structure))
    if unmapped or unused:
        raise ConversionError(
            f"the megatron model and the weight map disagree: model-only {unmapped[:4]}, "
            f"map-only {unused[:4]}"
        )


# ---- HF -> distributed checkpoint (offline, streaming) --------------------------------------


class _LayerFileWriter(FileSystemWriter):
    """torch's FileSystemWriter with one ``.distcp`` file per decoder layer (in model order).

    torch keeps every tensor of a file alive until the file is closed, so the file is the unit
    of memory: one layer here, instead of the whole model in its default single file.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1)

    def write_data(self, plan, planner):  # noqa: ANN001 (torch's signature)
        groups: dict[int, list[Any]] = {}
        for item in plan.items:
            groups.setdefault(_layer_of(item.index), []).append(item)
        files: queue.Queue = queue.Queue()
        for i, key in enumerate(sorted(groups)):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, groups[key]))
        return self._write_data(planner, files)


def _layer_of(index: Any) -> int:
    """The decoder layer of a chunk (-1 outside the decoder's layers).

    Heterogeneous (MoE) models key each layer (``decoder.layers.3.…``); homogeneous ones stack
    the layers along a leading axis of one key (``decoder.layers.…``, offset ``(3, …)``).
    """
    match = _LAYER.match(index.fqn)
    if match:
        return int(match.group(1))
    if index.fqn.startswith("decoder.layers.") and index.offset:
        return int(index.offset[0])
    return -1


class _LazySavePlanner(MCoreSavePlanner):
    """Resolves each tensor chunk only when the writer asks for it (one at a time)."""

    def __init__(self, produce: Callable[[Any], Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce = produce

    def resolve_data(self, write_item):  # noqa: ANN001 (torch's signature)
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        data = self._produce(write_item.index)
        return data.reshape(write_item.tensor_data.chunk.sizes)


class _HFSource:
    """Full megatron tensors computed from an HF checkpoint, the last one cached (gate/up)."""

    def __init__(self, checkpoint: HFCheckpoint, arch: Architecture, dtype: torch.dtype) -> None:
        self.checkpoint, self.arch, self.dtype = checkpoint, arch, dtype
        self.maps = {tm.megatron: tm for tm in tensor_maps(arch, "local")}
        self._cached: tuple[str, Tensor] | None = None
        self.done: set[str] = set()

    def full(self, name: str) -> Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous tensor before reading the next
            tm = self.maps[name]
            tensor = tm.to_megatron([self.checkpoint.tensor(n) for n in tm.hf], self.arch)
            self._cached = (name, tensor.to(self.dtype).contiguous())
            self.done.add(name)
        return self._cached[1]


def _source_dtype(checkpoint: HFCheckpoint, arch: Architecture, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        return dtype_of(dtype)
    first = next(iter(tensor_maps(arch, "local"))).hf[0]
    return checkpoint.tensor(first).dtype


def check_target_layout(hf_config: Mapping[str, Any], parallel: ParallelConfig) -> None:
    """A one-line ConfigError if the layout cannot train this model (heads, vocab, experts)."""
    stage = parallel.tp * parallel.cp
    expert = parallel.ep * parallel.expert_tp
    dp = expert // math.gcd(stage, expert)  # the fewest data-parallel ranks the experts fit in
    layout = dataclasses.replace(parallel, dp=None, world_size=None)
    check_layout(layout, ModelFacts.from_hf(hf_config), stage * parallel.pp * dp)


def convert_hf_to_megatron(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: ParallelConfig | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write an HF checkpoint as a megatron-core distributed checkpoint; returns a summary.

    ``target`` (optional) is the layout the checkpoint is meant for: it is checked against the
    model (the checkpoint itself loads into any layout). Runs in one process (`single_rank`).
    """
    checkpoint = HFCheckpoint(source)
    out = check_output_dir(out_dir, overwrite)
    arch = Architecture.from_hf(checkpoint.config)
    check_hf_names(checkpoint.names(), arch)
    if target is not None:
        check_target_layout(checkpoint.config, target)
    torch_dtype = _source_dtype(checkpoint, arch, dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with single_rank(checkpoint.config):
            summary = _write_from_hf(checkpoint, arch, torch_dtype, tmp, progress)
        write_hf_files(tmp, checkpoint.config, checkpoint.path, target)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_from_hf(
    checkpoint: HFCheckpoint, arch: Architecture, dtype: torch.dtype, out: Path,
    progress: Progress | None,
) -> dict[str, Any]:  # fmt: skip
    structure = meta_structure(checkpoint.config, dtype)
    source = _HFSource(checkpoint, arch, dtype)
    _check_against_map(structure, source.maps)
    where: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
    flat: dict[str, ShardedTensor] = {}
    for name, item in structure.items():
        for i, piece in enumerate(pieces(item, item.data)):
            where[(piece.key, tuple(piece.global_offset))] = (name, i)
            flat[f"{name}#{i}"] = piece
    total, written = len(where), [0]

    def produce(index) -> Tensor:  # noqa: ANN001 (a torch MetadataIndex)
        name, i = where[(index.fqn, tuple(index.offset))]
        item = structure[name]  # megatron keeps some tensors in fp32 (the local spec's norms)
        data = pieces(item, source.full(name).to(item.data.dtype))[i].data
        written[0] += 1
        if progress is not None:
            progress(written[0], total)
        return data

    _write_dcp(flat, out, _LazySavePlanner(produce))
    if written[0] != total or source.done != set(source.maps):
        raise ConversionError(f"wrote {written[0]} of {total} tensor pieces")
    return {"tensors": len(structure), "pieces": total, "dtype": str(dtype)}


def _write_dcp(sharded: dict[str, Any], out: Path, planner: MCoreSavePlanner) -> None:
    """Write ShardedTensors (factories applied) in megatron's torch_dist format (collective).

    megatron's own `dist_checkpointing.save` always goes through its asynchronous writer,
    which starts worker processes (and needs psutil); this is the same format, written
    synchronously by torch's writer in this process, one file per layer.
    """
    grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    if dist.get_rank() == 0:  # what megatron keeps outside the tensors: nothing, for a model
        common = ShardedObject("common_state", {}, (1,), (0,), replica_id=0)
        grouped[common.unique_key] = [common]
    state = mcore_to_pyt_state_dict(grouped, is_loading=False)
    dcp_save(state, storage_writer=_LayerFileWriter(out), planner=planner)
    if dist.get_rank() == 0:
        save_config(CheckpointingConfig(*BACKEND), str(out))
    dist.barrier()


# ---- distributed checkpoint -> HF (offline, streaming) --------------------------------------


def megatron_to_hf_tensors(
    ckpt_dir: str | Path,
    hf_config: Mapping[str, Any],
    *,
    progress: Progress | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``(hf_name, tensor)`` of a distributed checkpoint, one decoder layer loaded at a time.

    Must run inside `single_rank` (the converter CLI does this).
    """
    path = str(Path(ckpt_dir).expanduser())
    arch = Architecture.from_hf(hf_config)
    stored = dist_checkpointing.load_tensors_metadata(path)
    embedding = stored.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError(f"{path}: checkpoint has no embedding.word_embeddings.weight")
    structure = meta_structure(hf_config, embedding.dtype)
    maps = {tm.megatron: tm for tm in tensor_maps(arch, "local")}
    _check_against_map(structure, maps)
    check_stored(structure, stored, path)
    groups = [list(g) for _, g in itertools.groupby(maps.values(), key=lambda tm: tm.layer)]
    done = 0
    for group in groups:  # embedding, layer 0, ..., layer L-1, final norm + output layer
        request, shapes = {}, {}  # shapes: per tensor, its pieces' (key, local shape)
        for tm in group:
            item = structure[tm.megatron]
            parts = pieces(item, torch.empty(item.data.shape, dtype=item.data.dtype))
            shapes[tm.megatron] = [(f"{tm.megatron}#{i}", p.local_shape)
                                   for i, p in enumerate(parts)]
            for (key, _), piece in zip(shapes[tm.megatron], parts, strict=True):
                request[key] = _without_prepended_axes(piece)
        loaded = dist_checkpointing.load(request, path, validate_access_integrity=False)
        for tm in group:
            item = structure[tm.megatron]
            parts = [loaded.pop(key).reshape(shape) for key, shape in shapes[tm.megatron]]
            full = parts[0] if isinstance(item, ShardedTensor) else item.merge_fn(parts)
            # HF checkpoints have one dtype: the model's (fp32-kept norms are cast back)
            yield from zip(tm.hf, tm.to_hf(full.to(embedding.dtype), arch), strict=True)
            done += 1
            if progress is not None:
                progress(done, len(maps))
        del loaded


def _without_prepended_axes(piece: ShardedTensor) -> ShardedTensor:
    """The same chunk with its layer / expert axes as real size-1 dims.

    megatron routes tensors with prepended axes through torch's ShardedTensor, which in a world
    of one assumes the rank holds every chunk of the key; loading one layer of a layer-stacked
    dense model needs the plain path, which reads any sub-block.
    """
    shape = (1,) * piece.prepend_axis_num + tuple(piece.local_shape)
    return dataclasses.replace(
        piece, data=torch.empty(shape, dtype=piece.data.dtype), local_shape=shape,
        prepend_axis_num=0,
    )


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_from: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a distributed checkpoint as an HF checkpoint (config + tokenizer files copied)."""
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (give a megatron distributed checkpoint)")
    if hf_config_from is not None:
        config_file = Path(hf_config_from).expanduser() / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{config_file}: not found (--hf-config takes an HF model dir)")
        hf_config = json.loads(config_file.read_text())
        tokenizer_from = Path(hf_config_from).expanduser()
        if not (path / "metadata.json").is_file():
            raise ConversionError(f"{path}: not a megatron distributed checkpoint")
    else:
        hf_config = read_hf_config(path)
        tokenizer_from = path / HF_FILES
    check_output_dir(out_dir, overwrite)
    with single_rank(hf_config), HFCheckpointWriter(
        out_dir, hf_config, tokenizer_from=tokenizer_from, max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    ) as writer:  # fmt: skip
        writer.add_all(megatron_to_hf_tensors(path, hf_config, progress=progress))
    return {"tensors": writer.num_tensors, "bytes": writer.total_bytes}
