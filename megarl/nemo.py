"""nemo-run integration: megarl's recipes as ``run.Config`` trees, the training task as a
``run.Partial``, and the executors a user launches them with (Slurm with the torchrun launcher,
or local). Needs the ``nemo`` extra; imported only by those who launch through nemo-run.

The YAML recipe stays the single source of truth: `recipe` loads and validates it like
``megarl train`` does, then mirrors the dataclass tree as ``run.Config`` objects, so a user can
edit it in Python (``task.config.trainer.lr = 2e-6``) before the run; `train` validates again on
every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megarl.config import Config, load_config
from megarl.errors import UserError

# the launch environment every rank needs (the same defaults as slurm/lib/launch.sh)
RANK_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def nemo_run() -> Any:
    try:
        import nemo_run as run
    except ImportError:
        raise UserError("launching through nemo-run needs nemo-run: "
                        "pip install 'megarl[nemo]'") from None
    return run


def as_run_config(value: Any) -> Any:
    """A config dataclass as a ``run.Config`` tree (plain values, lists and dicts as they are)."""
    run = nemo_run()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: as_run_config(getattr(value, f.name))
                  for f in dataclasses.fields(value)}
        return run.Config(type(value), **fields)
    if isinstance(value, Mapping):
        return {k: as_run_config(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_run_config(v) for v in value]
    return value


def recipe(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The recipe at ``path`` with dotted ``overrides``, validated, as ``run.Config[Config]``."""
    return as_run_config(load_config(path, list(overrides)))


def train(config: Config) -> None:
    """The task every rank runs: validate the (possibly edited) config and the files it
    names, then train."""
    config.validate()
    from megarl.assemble import check_paths
    from megarl.startup import quiet_libraries

    check_paths(config)
    quiet_libraries()
    from megarl.trainer import Trainer

    Trainer(config).fit()


def train_task(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """``run.Partial(train, config=recipe(path, overrides))``."""
    return nemo_run().Partial(train, config=recipe(path, overrides))


def slurm_executor(*, account: str, partition: str, nodes: int, gpus_per_node: int = 8,
                   time: str = "04:00:00", container_image: str | None = None,
                   container_mounts: Sequence[str] = (), job_dir: str = "nemo_experiments",
                   tunnel: Any = None) -> Any:  # fmt: skip
    """A Slurm executor for exclusive H100 nodes with the torchrun launcher (one torchrun per
    node, ``gpus_per_node`` ranks each); ``tunnel`` defaults to submitting from this host."""
    run = nemo_run()
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node, exclusive=True, time=time,
        container_image=container_image, container_mounts=list(container_mounts),
        tunnel=tunnel or run.LocalTunnel(job_dir=str(Path(job_dir).absolute())),
        env_vars=dict(RANK_ENV), launcher="torchrun")


def local_executor(ranks: int = 1) -> Any:
    """This machine, ``ranks`` processes under torchrun (the quickstart runs with one)."""
    run = nemo_run()
    return run.LocalExecutor(ntasks_per_node=ranks, launcher="torchrun",
                             env_vars=dict(RANK_ENV))
