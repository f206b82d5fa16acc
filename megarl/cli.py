"""The ``megarl`` command: ``train | eval | convert | plan``.

Exit status: 0 success, 2 a user error (bad config, missing file: one ``error:`` line on
stderr, no traceback), 3 a subcommand that is not implemented yet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megarl import __version__
from megarl.convert.cli import DIRECTIONS, add_arguments
from megarl.convert.cli import run as run_conversion
from megarl.errors import UserError

EXIT_USER_ERROR = 2
EXIT_NOT_IMPLEMENTED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megarl",
        description="RL with verifiable rewards for MoE models on Megatron-core.",
        epilog="Overrides are dotted KEY=VALUE pairs with YAML values, e.g. "
        "algo.loss=dapo algo.params.eps_high=0.28 parallel.ep=8",
    )
    parser.add_argument("--version", action="version", version=f"megarl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("plan", "validate a config and print the run it describes"),
        ("train", "run RL training"),
        ("eval", "evaluate a policy: avg@k, maj@k, pass@k (not implemented yet)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    convert = sub.add_parser(
        "convert",
        help="convert checkpoints HF <-> megatron distributed (streaming, CPU)",
        description="convert checkpoints HF <-> megatron distributed (streaming, CPU)",
    )
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for direction in DIRECTIONS:
        add_arguments(directions.add_parser(direction, help=direction.replace("-to-", " -> ")),
                      direction)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``megarl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "convert":
        return run_conversion(args.direction, args)
    from megarl.config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "plan":
        from megarl.plan import print_plan

        print_plan(config)
        return 0
    if args.command == "train":
        from megarl.trainer import Trainer

        Trainer(config).fit()
        return 0
    return _not_implemented("eval", "sampling-based evaluation (megarl.evaluate)")


def _not_implemented(command: str, feature: str) -> int:
    print(
        f"megarl {command}: not implemented yet - {feature} lands in a later issue; "
        "`megarl plan CONFIG` validates a config today.",
        file=sys.stderr,
    )
    return EXIT_NOT_IMPLEMENTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
