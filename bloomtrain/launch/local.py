"""Running the ranks on this machine: torchrun (under ``bloomtrain.launch.torchrun``) with the stop
signals passed on once, the ranks' heartbeats watched, and no process left behind.

SIGTERM, SIGUSR1 or Ctrl-C sent to the launcher reaches every rank through torchrun (which is told to
pass SIGUSR1 on too, and to give the ranks ``launch.stop_grace_seconds`` to save); when the ranks
stopped with a checkpoint, the launcher exits with their status, 75, so a job script can requeue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bloomtrain.distributed import free_port
from bloomtrain.health import quiet_ranks
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, STOP_SIGNALS


def torchrun_command(processes: int, overrides: list[str], stop_grace_seconds: int = 600, nodes: int = 1,
                     rendezvous: str | None = None) -> list[str]:
    """torchrun for this machine's share (``processes / nodes``) of the ranks."""
    if rendezvous:
        # The same id on every node (the SLURM job, requeues included) lets their torchruns find each other.
        run_id = os.environ.get("SLURM_JOB_ID", "bloomtrain")
        where = ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", rendezvous,
                 "--rdzv_id", run_id]
    else:
        where = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", "bloomtrain.launch.torchrun", "--nproc_per_node", str(processes // nodes), *where,
            "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown_timeout", str(stop_grace_seconds), "-m", "bloomtrain.train", *overrides]


def end_process_tree(root: int, grace_seconds: float = 10.0) -> None:
    """SIGTERM ``root`` and every process under it (torchrun puts each rank in a session of its own, so
    a process group does not reach them), then SIGKILL whatever is left after ``grace_seconds``."""
    import psutil

    try:
        parent = psutil.Process(root)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_seconds)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_seconds)


def run_forwarding_stops(command: list[str], env: dict[str, str], run_dir: Path,
                         hang_warning_minutes: float = 0.0, hang_warning_factor: float = 10.0) -> int:
    """Run torchrun, passing SIGTERM/SIGUSR1/SIGINT on once; 75 if the ranks then stopped with a
    checkpoint. A second Ctrl-C ends every process at once; no rank outlives the launcher."""
    started = time.time()
    # A session of its own: a signal to our process group reaches torchrun once, from us, not twice.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stop_requested = False
    interrupts = 0

    def forward(signum: int, _frame) -> None:
        nonlocal stop_requested, interrupts
        stop_requested = True
        interrupts += signum == signal.SIGINT
        if interrupts > 1:
            print("bloomtrain.launch: second Ctrl-C: ending every rank now, without a checkpoint",
                  file=sys.stderr, flush=True)
            end_process_tree(child.pid, grace_seconds=2)
            return
        if signum == signal.SIGINT:
            print("bloomtrain.launch: Ctrl-C: the ranks save a checkpoint after this step, then exit "
                  "(Ctrl-C again to end them at once)", file=sys.stderr, flush=True)
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    warned: set[int] = set()
    try:
        while (status := _wait(child, 5.0 if hang_warning_minutes else None)) is None:
            for rank, (beat, bound) in quiet_ranks(run_dir, started, hang_warning_minutes * 60,
                                                    hang_warning_factor).items():
                if rank not in warned:
                    warned.add(rank)
                    print(f"bloomtrain.launch: rank {rank} has not responded for over {bound:.0f} s "
                          f"(after step {beat['step']}) while other ranks have: it hangs or is stopped "
                          f"({run_dir}/heartbeats). Its peers give up at the collective timeout (distributed.*)",
                          file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # the launcher itself is failing: take its processes with it
            end_process_tree(child.pid)
    record = run_dir / STOP_RECORD
    if stop_requested and status != 0 and record.exists() and record.stat().st_mtime >= started:
        return EXIT_RESUMABLE
    return status


def _wait(child: subprocess.Popen, seconds: float | None) -> int | None:
    try:
        return child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None
