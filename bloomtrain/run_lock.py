"""One run per run directory: ``RUN_DIR/run.lock``, held by rank 0 of the run that trains there.

A second start on the same directory (a double submit, a requeue racing the old job) would append to
the same ``metrics.jsonl`` and save over the same checkpoints. Rank 0 takes the lock before anything
of the run is written; every rank then learns the outcome, so a refused start exits 2 on all of them,
with one line naming the holder, having written nothing.

The lock file is created with ``O_CREAT | O_EXCL``, which is atomic on local disks and on the shared
file systems clusters use (NFSv3 and later, Lustre, GPFS), where ``flock``/``fcntl`` locks are not
dependable. It records the holder (host, process, start time, SLURM job and restart count), and a
thread touches it every :data:`REFRESH_SECONDS`, so its age says whether the holder is alive wherever
it runs. A dead holder does not keep the lock. A lock is taken over, with a notice, when:

- its holder ran on this host and that process is gone (or the pid now belongs to a newer process);
- it was not refreshed for :data:`STALE_SECONDS` (a holder on another node that died);
- it belongs to an earlier start of the same SLURM job: a requeued job's predecessor, which SLURM has
  ended before it starts the job again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
REFRESH_SECONDS = 15.0
STALE_SECONDS = 120.0


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the run directory."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, since {since}"


def why_stale(holder: dict, age_seconds: float) -> str | None:
    """Why the lock's holder cannot be running any more, or None when it may be."""
    me = _holder_record()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] and holder.get("restart", 0) < me["restart"]:
        return "an earlier start of this SLURM job, which SLURM ended before requeueing it"
    if holder.get("host") == me["host"]:
        import psutil

        try:
            started = psutil.Process(int(holder["pid"])).create_time()
        except (psutil.NoSuchProcess, KeyError, ValueError):
            return "its process is gone"
        if started > holder.get("since", 0) + 1:
            return "its process is gone (the pid now belongs to another one)"
        return None
    if age_seconds > STALE_SECONDS:
        return f"it was not refreshed for {age_seconds:.0f} s (its holder refreshes it every {REFRESH_SECONDS:g} s)"
    return None


class RunLock:
    """Take with :meth:`acquire` (rank 0), give back with :meth:`release`; refreshed by a thread meanwhile."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.record = _holder_record()
        self.taken_over: str | None = None  # the stale holder this start replaced, for a notice
        self._stopped = threading.Event()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirectoryBusy` naming its live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us can be taken by a third start in between
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._read_holder()
                if holder is None:  # being written, or just removed: look again
                    time.sleep(0.2)
                    continue
                reason = why_stale(holder, age)
                if reason is None:
                    raise RunDirectoryBusy(f"{self.path.parent} is in use by another run ({describe(holder)}); "
                                           "wait for it to end, stop it, or choose another run.dir") from None
                self.taken_over = f"{describe(holder)}: {reason}"
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.record, handle)
            threading.Thread(target=self._refresh, name="bloomtrain-run-lock", daemon=True).start()
            return
        raise RunDirectoryBusy(f"{self.path} keeps changing hands; another start is racing this one")

    def _read_holder(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except (FileNotFoundError, ValueError):
            return None, 0.0

    def _refresh(self) -> None:
        while not self._stopped.wait(REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (a start that took it over as stale keeps its own)."""
        self._stopped.set()
        holder, _ = self._read_holder()
        if holder is not None and (holder.get("host"), holder.get("pid"), holder.get("since")) == (
                self.record["host"], self.record["pid"], self.record["since"]):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def hold_run_directory(run_dir: Path, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock and every rank learns the outcome, so a refused
    start raises :class:`RunDirectoryBusy` on all of them. Rank 0 gets the lock to release at the end."""
    import torch.distributed as dist

    lock, outcome = (RunLock(run_dir) if is_main else None), [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunDirectoryBusy as error:
            outcome = [str(error)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirectoryBusy(outcome[0])
    if lock is not None and lock.taken_over:
        logger.warning("took over %s from %s", lock.path, lock.taken_over)
    return lock
