"""Launch a megarl recipe through nemo-run (``pip install 'megarl[nemo]'``).

    # 4 nodes x 8 H100 on Slurm, submitted from this host (or pass an SSH tunnel in code):
    python examples/nemo_run/launch.py examples/configs/up_gspo_30b.yaml \
        --slurm --account ACCOUNT --partition PARTITION --nodes 4 [--container-image IMAGE] \
        [KEY=VALUE ...]
    # this machine, one process (the quickstart):
    python examples/nemo_run/launch.py examples/configs/quickstart.yaml
    # print what would run, run nothing:
    python examples/nemo_run/launch.py examples/configs/up_gspo_30b.yaml --slurm ... --dryrun

The recipe is the same YAML file ``megarl train`` and ``sbatch slurm/*.sh`` use; edit the
returned ``run.Config`` tree in Python before launching if you prefer (``task.config.trainer.lr``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megarl.nemo import local_executor, nemo_run, slurm_executor, train_task


def build(argv: Sequence[str] | None = None) -> tuple[object, object, argparse.Namespace]:
    """The task (``run.Partial``), its executor and the parsed arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a YAML recipe, e.g. examples/configs/up_gspo_30b.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (default: local)")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--container-image")
    p.add_argument("--container-mounts", nargs="*", default=[])
    p.add_argument("--job-dir", default="nemo_experiments")
    p.add_argument("--dryrun", action="store_true", help="show what would run; run nothing")
    args = p.parse_intermixed_args(argv)
    task = train_task(args.recipe, args.overrides)
    if args.slurm:
        if not (args.account and args.partition):
            p.error("--slurm needs --account and --partition")
        world = task.config.parallel.world_size
        if world is not None and world != args.nodes * args.gpus_per_node:
            p.error(f"the recipe's parallel.world_size={world} needs --nodes "
                    f"{world // args.gpus_per_node} (or override parallel.world_size)")
        executor = slurm_executor(
            account=args.account, partition=args.partition, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, time=args.time,
            container_image=args.container_image, container_mounts=args.container_mounts,
            job_dir=args.job_dir)
    else:
        executor = local_executor(task.config.parallel.world_size or 1)
    return task, executor, args


def main(argv: Sequence[str] | None = None) -> int:
    task, executor, args = build(argv)
    run = nemo_run()
    name = Path(args.recipe).stem
    with run.Experiment(name, executor=executor, base_dir=args.job_dir) as exp:
        exp.add(task, name=name)
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(detach=args.slurm, tail_logs=not args.slurm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
