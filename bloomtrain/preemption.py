"""Stopping cleanly before the allocation ends: SIGTERM, SIGUSR1, Ctrl-C (SIGINT) and a wall-clock budget.

SLURM sends SIGTERM when a job is preempted or cancelled, and SIGUSR1 ahead of its time limit when
asked (``#SBATCH --signal=USR1@180``). A signal only sets a flag; at the next step boundary every
rank takes part in one small all-reduce, so all of them agree to stop after the same step, save a
checkpoint and exit with :data:`EXIT_RESUMABLE`. The same happens once ``train.exit_duration_minutes``
have passed on any rank. Repeated signals change nothing (SLURM signals every process of a step and
torchrun forwards the signal as well); SIGKILL is the way to stop without a checkpoint.

Rank 0 leaves ``RUN_DIR/stopped.json`` (step and reason), which ``bloomtrain.launch`` reads to exit
with the same status as its ranks.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_RESUMABLE = 75
"""Exit status after a requested stop with a checkpoint saved: EX_TEMPFAIL, "try again later".
A job script requeues on it (``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C saves too
STOP_RECORD = "stopped.json"


class StopRequests:
    """Collects stop requests on this rank; :meth:`agreed_reason` turns them into one decision for all."""

    def __init__(self, exit_duration_minutes: float = 0.0) -> None:
        self.received: str | None = None
        self.budget_seconds = exit_duration_minutes * 60
        self.started = time.monotonic()
        self._previous = {}
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed_reason(self, device: torch.device) -> str | None:
        """Collective: why every rank should stop now, or None to carry on."""
        over_budget = bool(self.budget_seconds) and time.monotonic() - self.started > self.budget_seconds
        flags = torch.tensor([self.received is not None, over_budget], dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return self.received or "a stop signal on another rank"
        if flags[1]:
            return f"train.exit_duration_minutes={self.budget_seconds / 60:g} reached"
        return None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
