"""Hugging Face checkpoints on disk: lazy reading and sharded, atomic writing (safetensors).

Reading opens each shard memory-mapped and returns one tensor at a time, so a converter holds
only what it is working on. Writing buffers tensors up to ``max_shard_bytes``, writes the shard,
and at the end writes ``model.safetensors.index.json``, ``config.json`` and the tokenizer files of
the source; everything goes to a temporary directory renamed into place at the end, so a failed
conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from megarl.convert.mapping import ConversionError

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
    "chat_template.jinja",
)  # fmt: skip


class HFCheckpoint:
    """A local HF checkpoint directory: ``config`` and lazy ``tensor(name)``.

    Shards are memory-mapped; at most ``OPEN_FILES`` stay mapped, and a mapping is dropped after
    ``REMAP_BYTES`` have been read through it, so the file pages a long conversion touches do
    not pile up in its resident set.
    """

    REMAP_BYTES = 256 << 20
    OPEN_FILES = 2

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ConversionError(f"{self.path}: not a directory (give a local HF checkpoint)")
        config = self.path / "config.json"
        if not config.is_file():
            raise ConversionError(f"{self.path}: no config.json")
        self.config: dict[str, Any] = json.loads(config.read_text())
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            self._files = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        if name in self._files:
                            raise ConversionError(
                                f"{self.path}: tensor {name} is in both "
                                f"{self._files[name].name} and {file.name}"
                            )
                        self._files[name] = file
        if not self._files:
            raise ConversionError(f"{self.path}: no *.safetensors weights")
        self._open: dict[Path, Any] = {}
        self._mapped_bytes: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def tensor(self, name: str) -> Tensor:
        file = self._files.get(name)
        if file is None:
            raise ConversionError(f"{self.path}: tensor {name} is missing")
        if file not in self._open:
            if not file.is_file():
                raise ConversionError(f"{file}: listed in {INDEX} but missing")
            while len(self._open) >= self.OPEN_FILES:  # unmap the least recently opened
                del self._open[next(iter(self._open))]
            self._open[file] = safe_open(str(file), "pt")
            self._mapped_bytes[file] = 0
        tensor = self._open[file].get_tensor(name)  # a copy: safe to unmap the file after
        self._mapped_bytes[file] += tensor.numel() * tensor.element_size()
        if self._mapped_bytes[file] > self.REMAP_BYTES:
            del self._open[file]  # unmapping drops the pages read so far from our RSS
        return tensor


class HFCheckpointWriter:
    """Write ``(name, tensor)`` pairs as a sharded HF checkpoint; use as a context manager."""

    def __init__(
        self,
        out_dir: str | Path,
        config: Mapping[str, Any],
        *,
        tokenizer_from: str | Path | None = None,
        max_shard_bytes: int = 4 << 30,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = check_output_dir(out_dir, overwrite)
        self.tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        self.config = dict(config)
        self.tokenizer_from = None if tokenizer_from is None else Path(tokenizer_from)
        self.max_shard_bytes = max_shard_bytes
        self._bucket: dict[str, Tensor] = {}
        self._bucket_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def __enter__(self) -> HFCheckpointWriter:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._seen:
            raise ConversionError(f"tensor {name} written twice")
        self._seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._bucket and self._bucket_bytes + size > self.max_shard_bytes:
            self._flush()
        self._bucket[name] = tensor.detach().to("cpu").contiguous()
        self._bucket_bytes += size
        self.total_bytes += size

    @property
    def num_tensors(self) -> int:
        return len(self._seen)

    def add_all(self, pairs: Iterator[tuple[str, Tensor]]) -> None:
        for name, tensor in pairs:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._bucket:
            return
        save_file(self._bucket, str(self.tmp / f"shard-{len(self._shards)}.safetensors"),
                  metadata={"format": "pt"})
        self._shards.append(list(self._bucket))
        self._bucket, self._bucket_bytes = {}, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _finish(self) -> None:
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i}.safetensors").rename(self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
        if self.tokenizer_from is not None:
            copy_tokenizer_files(self.tokenizer_from, self.tmp)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.tmp.rename(self.out_dir)


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """An output directory a converter may write: absent or empty, or `overwrite` given."""
    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise ConversionError(f"{out.parent}: parent directory does not exist")
    return out


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer / generation files that exist in `source`; returns their names."""
    copied = []
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, dest / file)
            copied.append(file)
    return copied


def dtype_of(name: str) -> torch.dtype:
    """`torch.float32` from "float32" (config.json's ``torch_dtype`` / ``dtype``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConversionError(f"unknown dtype {name!r}")
    return dtype
