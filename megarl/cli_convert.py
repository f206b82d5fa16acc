"""``megarl convert hf-to-megatron | megatron-to-hf`` (also tools/convert_*.py): the command,
beside `megarl.cli` (the conversion itself is `megarl.megatron.hf_conversion`).

Both run in one process on CPU (no GPU, no torchrun) and stream: see
`megarl.megatron.hf_conversion`. Arguments are checked before megatron is imported, so a bad path
or layout fails in a second with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from megarl.errors import ConfigError, UserError

DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")


def add_arguments(parser: argparse.ArgumentParser, direction: str) -> None:
    if direction == "hf-to-megatron":
        parser.add_argument("--hf", required=True, metavar="DIR",
                            help="HF checkpoint directory (config.json + *.safetensors)")
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="megatron distributed checkpoint to write")
        for flag, text in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert"),
                           ("--etp", "expert-tensor")):
            parser.add_argument(flag, type=int, default=None, metavar="N",
                                help=f"{text}-parallel size the checkpoint is for: checked "
                                     "against the model (the checkpoint loads into any layout)")
        parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                            help="cast weights (default: keep the checkpoint's dtype)")
    else:
        parser.add_argument("--megatron", required=True, metavar="DIR",
                            help="megatron distributed checkpoint (converted or saved by megarl)")
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="HF checkpoint directory to write")
        parser.add_argument("--hf-config", metavar="DIR",
                            help="take config.json and tokenizer files from this HF directory "
                                 "(default: the checkpoint's own hf/)")
        parser.add_argument("--shard-size-gb", type=float, default=4.0,
                            help="safetensors shard size (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser(direction: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"convert_{direction.replace('-', '_')}.py",
        description=f"convert a checkpoint {direction.replace('-to-', ' -> ')} (streaming, CPU)",
    )
    add_arguments(parser, direction)
    return parser


def run(direction: str, args: argparse.Namespace) -> int:
    """Convert; a `UserError` (bad path, layout or tensor) propagates as one line."""
    from megarl.convert.hf_io import check_output_dir

    out = check_output_dir(args.out, args.overwrite)  # before megatron is imported
    try:
        if direction == "hf-to-megatron":
            return _hf_to_megatron(args, out)
        return _megatron_to_hf(args, out)
    except ConfigError as e:  # name the command-line flag, not the config field
        if not e.field.startswith("parallel."):
            raise
        flag = "--" + e.field.removeprefix("parallel.")
        raise UserError(f"{flag} {e.value}: {e.allowed}") from None


def _hf_to_megatron(args: argparse.Namespace, out: Path) -> int:
    from megarl.config import ParallelConfig
    from megarl.convert.hf_io import HFCheckpoint

    source = Path(args.hf).expanduser()
    HFCheckpoint(source)  # bad path / no config / no weights: fail before importing megatron
    sizes = {k: getattr(args, k) for k in ("tp", "pp", "ep", "etp")}
    target = None
    if any(v is not None for v in sizes.values()):
        target = ParallelConfig(**{k: v for k, v in sizes.items() if v is not None})
        target.check()
    from megarl.megatron.hf_conversion import convert_hf_to_megatron

    start = time.perf_counter()
    with _progress("HF -> megatron", args.quiet) as progress:
        summary = convert_hf_to_megatron(source, out, target=target, dtype=args.dtype,
                                         overwrite=args.overwrite, progress=progress)
    print(f"wrote {out}: {summary['tensors']} tensors ({summary['pieces']} pieces, "
          f"{summary['dtype']}) in {time.perf_counter() - start:.1f}s")
    return 0


def _megatron_to_hf(args: argparse.Namespace, out: Path) -> int:
    source = Path(args.megatron).expanduser()
    if not (source / "metadata.json").is_file():
        raise UserError(f"--megatron {source}: not a megatron distributed checkpoint "
                        "(no metadata.json)")
    if args.shard_size_gb <= 0:
        raise UserError(f"--shard-size-gb {args.shard_size_gb}: must be > 0")
    from megarl.megatron.hf_conversion import convert_megatron_to_hf

    start = time.perf_counter()
    with _progress("megatron -> HF", args.quiet) as progress:
        summary = convert_megatron_to_hf(
            source, out, hf_config_from=args.hf_config, overwrite=args.overwrite,
            max_shard_bytes=int(args.shard_size_gb * (1 << 30)), progress=progress,
        )  # fmt: skip
    print(f"wrote {out}: {summary['tensors']} tensors, {summary['bytes'] / 2**30:.2f} GiB "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


@contextmanager
def _progress(title: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar fed ``(done, total)``; none when quiet or not a terminal."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        f"[bold]{title}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task(title, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def main(direction: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/convert_*.py: exit 0, or 2 with one ``error:`` line."""
    args = build_parser(direction).parse_args(argv)
    try:
        return run(direction, args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
