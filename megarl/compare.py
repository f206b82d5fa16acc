"""Objectives side by side: ``megarl compare CONFIG --losses a,b --seeds 3 [KEY=VALUE ...]``.

One base config, every (objective, seed) pair run as a normal ``megarl train`` in its own run
directory ``OUT/<loss>/seed<k>`` (``logging.dir=OUT/<loss> logging.run_name=seed<k>``), up to
``--jobs`` at a time, then the side-by-side report (`megarl.compare_report`) in ``OUT/report``.

Resumable: a pair whose run reported ``finished`` (``OUT/<loss>/seed<k>.status.json``, the stop
status `megarl.stop_signals` writes) is not rerun; a pair that was stopped or killed is started
again with the same command, and ``checkpoint.resume=auto`` continues it from its newest
checkpoint. ``OUT/compare.json`` records the comparison; running a different one into the same
folder is refused, so no report ever mixes two set-ups.

Nothing here is specific to a task: ``--print-commands`` prints each pair's ``megarl train``
command, and ``--print-commands --sbatch slurm/<recipe>.sh`` one ``sbatch`` line per pair
through the Slurm launcher; ``megarl report OUT`` then draws the comparison from the run
directories (docs/experiments.md).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megarl.errors import UserError

MANIFEST = "compare.json"


@dataclass(frozen=True)
class Pair:
    """One objective under one seed."""

    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}/seed{self.seed}"


@dataclass(frozen=True)
class Comparison:
    """What `megarl compare` runs: the base config, its overrides, the objectives and seeds."""

    config: str
    overrides: tuple[str, ...]
    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path

    @classmethod
    def make(cls, config: str, overrides: Sequence[str], losses: str, seeds: int,
             first_seed: int, out: str | Path) -> Comparison:  # fmt: skip
        names = tuple(n.strip() for n in losses.split(",") if n.strip())
        if not names:
            raise UserError("--losses: give one loss name at least, e.g. --losses up_gspo,gspo")
        if len(set(names)) != len(names):
            raise UserError(f"--losses={losses!r}: a loss is listed twice")
        if seeds < 1:
            raise UserError(f"--seeds={seeds}: must be >= 1")
        for o in overrides:
            key = o.split("=", 1)[0]
            if key in ("algo.loss", "trainer.seed", "logging.dir", "logging.run_name"):
                raise UserError(f"override {o!r}: megarl compare sets {key} for each pair; "
                                "use --losses, --seeds, --first-seed and --out")
        return cls(config=str(config), overrides=tuple(overrides), losses=names,
                   seeds=tuple(range(first_seed, first_seed + seeds)), out=Path(out))

    def pairs(self) -> list[Pair]:
        return [Pair(loss, seed) for loss in self.losses for seed in self.seeds]

    def pair_overrides(self, pair: Pair) -> list[str]:
        return [*self.overrides, f"algo.loss={pair.loss}", f"trainer.seed={pair.seed}",
                f"logging.dir={self.out / pair.loss}", f"logging.run_name=seed{pair.seed}"]

    def run_dir(self, pair: Pair) -> Path:
        return self.out / pair.loss / f"seed{pair.seed}"

    def status_path(self, pair: Pair) -> Path:
        return self.out / pair.loss / f"seed{pair.seed}.status.json"

    def log_path(self, pair: Pair) -> Path:
        return self.out / pair.loss / f"seed{pair.seed}.log"

    def command(self, pair: Pair) -> list[str]:
        return [sys.executable, "-m", "megarl", "train", self.config, *self.pair_overrides(pair)]

    def finished(self, pair: Pair) -> bool:
        try:
            return json.loads(self.status_path(pair).read_text())["reason"] == "finished"
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def check(self) -> None:
        """Every pair's config validates (one line on the first that does not), before anything
        runs; a comparison already in ``out`` must be this one."""
        from megarl.config import load_config

        for pair in self.pairs():
            load_config(self.config, self.pair_overrides(pair))
        manifest = self.out / MANIFEST
        if manifest.is_file():
            before = json.loads(manifest.read_text())
            now = self.record()
            for key in ("config", "overrides"):
                if before.get(key) != now[key]:
                    raise UserError(
                        f"{manifest} holds another comparison ({key}: {before.get(key)!r}, now "
                        f"{now[key]!r}): pass another --out, or delete it to start over")

    def record(self) -> dict:
        """The manifest: what was compared, and how to run it again."""
        return {"config": self.config, "overrides": list(self.overrides),
                "losses": list(self.losses), "seeds": list(self.seeds), "out": str(self.out)}

    def write_manifest(self) -> None:
        """``compare.json``, merged with an earlier one (the union of losses and seeds)."""
        path = self.out / MANIFEST
        data = self.record()
        if path.is_file():
            before = json.loads(path.read_text())
            data["losses"] = list(dict.fromkeys([*before.get("losses", []), *data["losses"]]))
            data["seeds"] = sorted({*before.get("seeds", []), *data["seeds"]})
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_comparison(comparison: Comparison, jobs: int = 1, *,
                   echo: bool = True) -> dict[str, str]:  # fmt: skip
    """Run every unfinished pair, at most `jobs` at once; returns ``{pair: outcome}`` with
    outcome ``finished`` (this time or before) or ``failed (exit N, see LOG)``."""
    if jobs < 1:
        raise UserError(f"--jobs={jobs}: must be >= 1")
    comparison.check()
    comparison.write_manifest()
    outcome: dict[str, str] = {}
    todo = []
    for pair in comparison.pairs():
        if comparison.finished(pair):
            outcome[pair.name] = "finished"
            _say(echo, f"{pair.name}: finished before, not rerun")
        else:
            todo.append(pair)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_job(jobs)))
    running: dict[subprocess.Popen, tuple[Pair, float]] = {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                pair = todo.pop(0)
                comparison.run_dir(pair).parent.mkdir(parents=True, exist_ok=True)
                log = comparison.log_path(pair).open("ab")
                pair_env = env | {"MEGARL_STOP_STATUS": str(comparison.status_path(pair))}
                proc = subprocess.Popen(comparison.command(pair), stdout=log,
                                        stderr=subprocess.STDOUT, env=pair_env)
                log.close()
                running[proc] = (pair, time.monotonic())
                _say(echo, f"{pair.name}: started (log {comparison.log_path(pair)})")
            for proc in [p for p in running if p.poll() is not None]:
                pair, start = running.pop(proc)
                seconds = time.monotonic() - start
                if proc.returncode == 0 and comparison.finished(pair):
                    outcome[pair.name] = "finished"
                    _say(echo, f"{pair.name}: finished in {seconds:.0f} s")
                else:
                    outcome[pair.name] = (f"failed (exit {proc.returncode}, see "
                                          f"{comparison.log_path(pair)})")
                    _say(echo, f"{pair.name}: {outcome[pair.name]}")
            if running:
                time.sleep(0.2)
    finally:
        for proc in running:  # interrupted: no orphan keeps training
            proc.terminate()
        for proc in running:
            proc.wait()
    return outcome


def print_commands(comparison: Comparison, sbatch: str | None = None) -> None:
    """Each unfinished pair's command, one per line: ``megarl train`` with MEGARL_STOP_STATUS
    set, or with `sbatch` a Slurm job script of ``slurm/`` (whose recipe is the base config)
    submitted with the pair's overrides, one job per pair through the launcher (which requeues
    and resumes each as it does any run)."""
    comparison.check()
    for pair in comparison.pairs():
        if comparison.finished(pair):
            continue
        if sbatch is not None:
            print(shlex.join(["sbatch", sbatch, *comparison.pair_overrides(pair)]))
            continue
        status = shlex.quote(str(comparison.status_path(pair)))
        print(f"MEGARL_STOP_STATUS={status} " + shlex.join(comparison.command(pair)))


def _say(echo: bool, message: str) -> None:
    if echo:
        print(message, flush=True)
