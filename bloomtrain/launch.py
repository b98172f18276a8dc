"""Start a training run: ``python -m bloomtrain.launch [key=value ...]``.

Reads the same config as ``bloomtrain.train``, works out how many processes the layout needs
(tensor x pipeline x data; ``parallel.data=auto`` fills the visible GPUs, or is 1 on a CPU machine,
unless ``launch.processes`` says otherwise) and starts them with torchrun on this machine, every
override passed on unchanged. ``launch.dry_run=true`` prints the plan (memory per GPU, tokens, steps
and days, ``bloomtrain/plan.py``) and the command, and starts nothing.
``launcher=slurm`` instead writes and submits a SLURM job that runs this launcher on every node
(``bloomtrain/slurm.py``); with ``launch.rendezvous=HOST:PORT`` the nodes' torchruns meet there.

SIGTERM, SIGUSR1 or Ctrl-C sent to the launcher reaches every rank through torchrun (which is told to
pass SIGUSR1 on too, and to give the ranks ``launch.stop_grace_seconds`` to save); when the ranks
stopped with a checkpoint, the launcher exits with their status, 75, so a job script can requeue.
torchrun runs under ``bloomtrain.elastic``, which turns its failures into one line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.health import quiet_ranks
from bloomtrain.parallel.cpu import threads_per_rank
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, STOP_SIGNALS


def process_count(config: BloomTrainConfig) -> int:
    """All ranks of the run, over every node."""
    parallel, launch = config.parallel, config.launch
    model_parallel = parallel.tensor * parallel.pipeline
    if launch.processes is not None:
        return launch.processes
    if parallel.data != "auto":
        total = model_parallel * int(parallel.data)
    else:
        if config.launcher == "slurm":
            per_node = launch.slurm.gpus_per_node
            if not per_node:
                raise ConfigError("launcher=slurm with parallel.data=auto needs launch.slurm.gpus_per_node "
                                  "(GPU nodes), or parallel.data / launch.processes (CPU nodes)")
        else:
            per_node = torch.cuda.device_count() if torch.cuda.is_available() else 0
        total = max(per_node * launch.nodes // model_parallel, 1) * model_parallel
    if total % launch.nodes:
        raise ConfigError(f"{total} processes do not divide evenly over launch.nodes={launch.nodes}; "
                          "change parallel.data or launch.nodes")
    return total


def torchrun_command(processes: int, overrides: list[str], stop_grace_seconds: int = 600, nodes: int = 1,
                     rendezvous: str | None = None) -> list[str]:
    """torchrun for this machine's share (``processes / nodes``) of the ranks."""
    if rendezvous:
        # The same id on every node (the SLURM job, requeues included) lets their torchruns find each other.
        run_id = os.environ.get("SLURM_JOB_ID", "bloomtrain")
        where = ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", rendezvous,
                 "--rdzv_id", run_id]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        where = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [sys.executable, "-m", "bloomtrain.elastic", "--nproc_per_node", str(processes // nodes), *where,
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
                         hang_warning_minutes: float = 0.0) -> int:
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
            for rank, beat in quiet_ranks(run_dir, hang_warning_minutes * 60, started).items():
                if rank not in warned:
                    warned.add(rank)
                    print(f"bloomtrain.launch: rank {rank} has not responded for over {hang_warning_minutes:g} "
                          f"min (after step {beat['step']}) while other ranks have: it hangs or is stopped "
                          f"({run_dir}/heartbeats). Its peers give up after distributed.timeout_minutes",
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


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(overrides)
        from bloomtrain.parallel.layout import resolve_layout

        processes = process_count(config)
        layout = resolve_layout(config, processes)  # the same validation the ranks will do, before starting
    except ConfigError as error:
        print(f"bloomtrain.launch: config error: {error}", file=sys.stderr)
        return 2
    launch = config.launch
    plan = (f"{processes} processes = tensor {layout.tensor} x pipeline {layout.pipeline} x data {layout.data} "
            f"(ZeRO {layout.zero_stage}) on {launch.nodes} node{'s' if launch.nodes > 1 else ''}, "
            f"run directory {config.run.dir}")
    if launch.dry_run:
        from bloomtrain.plan import layout_of, plan_of

        try:
            estimate = plan_of(config, layout_of(config, layout.data))
        except ConfigError as error:
            print(f"bloomtrain.launch: config error: {error}", file=sys.stderr)
            return 2
        print(f"bloomtrain.launch: the plan (docs/planning.md):\n{estimate.table()}", flush=True)
        if not estimate.fits:
            print(f"bloomtrain.launch: warning: {estimate.memory.total / 2**30:.1f} GiB per GPU does not fit "
                  f"launch.gpu={config.launch.gpu}; try python -m bloomtrain.plan launch.suggest=true with the "
                  "same keys", file=sys.stderr, flush=True)
    if config.launcher == "slurm":
        return _submit_to_slurm(config, overrides, processes, plan)
    command = torchrun_command(processes, overrides, launch.stop_grace_seconds, launch.nodes, launch.rendezvous)
    print(f"bloomtrain.launch: {plan}", flush=True)
    if launch.dry_run:
        print(shlex.join(command))
        return 0
    env = dict(os.environ)
    threads = threads_per_rank(processes // launch.nodes,
                               int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1))
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return run_forwarding_stops(command, env, Path(config.run.dir), launch.hang_warning_minutes)


def _submit_to_slurm(config: BloomTrainConfig, overrides: list[str], processes: int, plan: str) -> int:
    from bloomtrain import slurm

    if config.launch.dry_run:
        print(f"bloomtrain.launch: would submit a SLURM job: {plan}; its script:", flush=True)
        print(slurm.job_script(config, overrides, processes))
        return 0
    try:
        job_id = slurm.submit(config, overrides, processes)
    except ConfigError as error:
        print(f"bloomtrain.launch: {error}", file=sys.stderr)
        return 2
    log = Path(config.run.dir).resolve() / slurm.JOB_DIR / f"{job_id}.out"
    print(f"bloomtrain.launch: submitted SLURM job {job_id}: {plan}\n  log: {log}\n  follow: squeue -j {job_id}"
          f"; stop with a checkpoint: scancel --signal=USR1 --batch {job_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
