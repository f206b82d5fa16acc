"""Stopping a run without losing work: SIGUSR1 (a time limit near: Slurm's
``--signal=B:USR1@SECONDS``, passed on by slurm/lib/launch.sh) and SIGTERM (preemption,
``scancel``) ask the trainer to stop at the end of the current step: it writes a checkpoint
there, reports it, and returns; a resume continues from exactly that step.

Every rank must stop at the same step, and a signal reaches the ranks at slightly different
moments, so the ranks agree at each step's end (one all-reduce of a flag). With
``trainer.stop_grace_s`` set, a rank still inside its step that many seconds after the signal
exits at once (status 143): the cluster's grace (Slurm's KillWait, a preemption's GraceTime) is
shorter than a step, and an exit now is cleaner than a SIGKILL later.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from megarl.metrics import comm_device

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STATUS_ENV = "MEGARL_STOP_STATUS"  # where to report a stop (the Slurm launcher sets it)


class StopRequests:
    """Catches the stop signals while a run trains (`install` / `uninstall`)."""

    def __init__(self, grace_s: float | None = None) -> None:
        self.grace_s = grace_s
        self.signal: str | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread (a run inside a test thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signal is None
        self.signal = signal.Signals(signum).name
        print(f"{self.signal}: stopping after this step, with a checkpoint", flush=True)
        if first and self.grace_s is not None:
            self._timer = threading.Timer(self.grace_s, self._out_of_time)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_time(self) -> None:
        print(f"{self.signal}: the step did not end within trainer.stop_grace_s="
              f"{self.grace_s:g}; exiting without a checkpoint (the run resumes from its "
              "newest one)", flush=True)
        os._exit(143)

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (collective)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(comm_device(None))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stopped(self) -> None:
        """The stop is done (checkpoint written): the grace timer has nothing left to guard."""
        if self._timer is not None:
            self._timer.cancel()


def report_stop(start_step: int, step: int, checkpoint: Path | None, reason: str) -> None:
    """Write ``$MEGARL_STOP_STATUS`` (the launcher decides on a requeue from it)."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    record = {"reason": reason, "start_step": start_step, "step": step,
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "time": time.time()}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
