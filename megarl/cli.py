"""The ``megarl`` command: ``plan | train | eval | compare | report | convert``.

Exit status: 0 success, 2 a user error (bad config, missing file: one ``error:`` line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megarl import __version__
from megarl.cli_convert import DIRECTIONS, add_arguments
from megarl.cli_convert import run as run_conversion
from megarl.errors import UserError

EXIT_USER_ERROR = 2


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
        ("eval", "evaluate a policy on data.eval: avg@k, maj@k, pass@k tables"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
        if name == "plan":
            p.add_argument("--skip-path-checks", action="store_true",
                           help="do not check that the model, tokenizer, data and resume paths "
                           "exist here (planning a run for another machine)")
        if name == "eval":
            p.add_argument("--checkpoint", metavar="PATH",
                           help="a run directory, one of its checkpoints/step_*, or an HF "
                           "checkpoint directory (default: model.name_or_path)")
            p.add_argument("--json", metavar="FILE", help="also write the tables as JSON")
            p.add_argument("--samples", metavar="FILE",
                           help="also write every problem's answers and grades as JSON lines")
    compare = sub.add_parser(
        "compare", help="run objectives side by side (every loss x seed) and report them",
        description="run every (loss, seed) pair of one base config as its own megarl train, "
        "at most --jobs at a time, resumable, then the side-by-side report under OUT/report/")
    compare.add_argument("config", help="YAML config file (the base every pair shares)")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted overrides for every pair")
    compare.add_argument("--losses", required=True, metavar="A,B,...",
                         help="the objectives (algo.loss names), e.g. up_gspo,gspo,grpo")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per objective (3)")
    compare.add_argument("--first-seed", type=int, default=1, help="seeds run from this (1)")
    compare.add_argument("--jobs", type=int, default=1, help="pairs run at once (1)")
    compare.add_argument("--out", metavar="DIR",
                         help="where the runs go (default: logging.dir/compare-<config name>)")
    compare.add_argument("--print-commands", action="store_true",
                         help="print each unfinished pair's megarl train command and stop "
                         "(one cluster job per pair)")
    compare.add_argument("--sbatch", metavar="JOB_SCRIPT",
                         help="with --print-commands: one 'sbatch JOB_SCRIPT overrides' line per "
                         "pair instead (a slurm/*.sh script whose recipe is CONFIG)")
    report = sub.add_parser("report", help="plot a run's curves as PNGs",
                            description="plot a run's curves (reward, accuracy, entropy, KL, "
                            "grad norm, regions, clipping) as PNGs under RUN_DIR/report/")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory with metrics.jsonl, or a megarl compare folder")
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides after an option (megarl compare C --losses a,b trainer.steps=5):
    # argparse leaves them over; they are overrides like those before it
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from megarl.startup import quiet_libraries

        quiet_libraries(note=False)
        return run_conversion(args.direction, args)
    if args.command == "report":
        from megarl.compare_report import is_comparison, write_comparison
        from megarl.report import write_report

        draw = write_comparison if is_comparison(args.run_dir) else write_report
        for path in draw(args.run_dir):
            print(path)
        return 0
    if args.command == "compare":
        return _compare(args)
    from megarl.assemble import check_paths
    from megarl.config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "plan":
        from megarl.plan_report import print_plan

        if not args.skip_path_checks:
            try:
                check_paths(config)
            except UserError as e:
                raise UserError(f"{e} (megarl plan --skip-path-checks plans a run for another "
                                "machine without checking them)") from None
        print_plan(config, paths_checked=not args.skip_path_checks)
        return 0
    # before the model is built and the run directory made
    if args.command == "train":
        check_paths(config)
    else:
        check_paths(config, evaluation=True, checkpoint=args.checkpoint)
    from megarl.startup import quiet_libraries

    quiet_libraries()  # before megatron is imported
    if args.command == "train":
        from megarl.trainer import Trainer

        Trainer(config).fit()
        return 0
    return _evaluate(config, args.checkpoint, args.json, args.samples)


def _compare(args: argparse.Namespace) -> int:
    from megarl.compare import Comparison, print_commands, run_comparison
    from megarl.compare_report import write_comparison
    from megarl.config import load_config

    out = args.out
    if out is None:
        base = load_config(args.config, args.overrides)
        out = Path(base.logging.dir) / f"compare-{Path(args.config).stem}"
    comparison = Comparison.make(args.config, args.overrides, args.losses, args.seeds,
                                 args.first_seed, out)
    if args.sbatch and not args.print_commands:
        raise UserError("--sbatch goes with --print-commands (it prints the jobs to submit)")
    if args.print_commands:
        print_commands(comparison, args.sbatch)
        return 0
    outcome = run_comparison(comparison, args.jobs)
    failed = {pair: what for pair, what in outcome.items() if what != "finished"}
    if len(failed) < len(outcome):
        for path in write_comparison(comparison.out):
            print(path)
    for pair, what in failed.items():
        print(f"error: {pair} {what}", file=sys.stderr)
    return 1 if failed else 0


def _evaluate(config: Any, checkpoint: str | None, json_path: str | None,
              samples_path: str | None) -> int:  # fmt: skip
    import json

    import torch.distributed as dist

    from megarl.eval_metrics import FAMILIES, format_table, summarise, write_results
    from megarl.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(config, checkpoint)
    summary = summarise(results, config.eval.reported_ks())
    if dist.get_rank() == 0:
        from rich.console import Console

        console = Console()
        console.print(f"{checkpoint or config.model.name_or_path or 'model'}: "
                      f"{config.eval.k} samples per problem (%)")
        columns = next(iter(summary.values()))
        for family in FAMILIES:
            if any(name.startswith(f"{family}@") for name in columns):
                console.print(format_table(summary, title=f"{family}@k", family=family))
        if json_path:
            Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
        if samples_path:
            write_results(results, samples_path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
