"""Start a training run: ``python -m bloomtrain.launch [key=value ...]``.

Reads the same config as ``bloomtrain.train``, works out how many processes the layout needs
(tensor x pipeline x data; ``parallel.data=auto`` fills the visible GPUs, or is 1 on a CPU machine,
unless ``launch.processes`` says otherwise) and starts them with torchrun on this machine, every
override passed on unchanged. ``launch.dry_run=true`` prints the plan and starts nothing.

SIGTERM or SIGUSR1 sent to the launcher reaches every rank through torchrun (which is told to pass
SIGUSR1 on too, and to give the ranks ``launch.stop_grace_seconds`` to save); when the ranks stopped
with a checkpoint, the launcher exits with their status, 75, so a job script can requeue.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, STOP_SIGNALS


def process_count(config: BloomTrainConfig) -> int:
    parallel = config.parallel
    model_parallel = parallel.tensor * parallel.pipeline
    if config.launch.processes is not None:
        return config.launch.processes
    if parallel.data != "auto":
        return model_parallel * int(parallel.data)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(devices // model_parallel, 1) * model_parallel


def torchrun_command(processes: int, overrides: list[str], stop_grace_seconds: int = 600) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown_timeout", str(stop_grace_seconds), "-m", "bloomtrain.train", *overrides]


def run_forwarding_stops(command: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Run torchrun, passing SIGTERM/SIGUSR1 on once; 75 if the ranks then stopped with a checkpoint."""
    started = time.time()
    # A session of its own: a signal to our process group reaches torchrun once, from us, not twice.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stop_requested = False

    def forward(signum: int, _frame) -> None:
        nonlocal stop_requested
        stop_requested = True
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    record = run_dir / STOP_RECORD
    if stop_requested and status != 0 and record.exists() and record.stat().st_mtime >= started:
        return EXIT_RESUMABLE
    return status


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
    command = torchrun_command(processes, overrides, config.launch.stop_grace_seconds)
    print(f"bloomtrain.launch: {processes} processes = tensor {layout.tensor} x pipeline {layout.pipeline} x "
          f"data {layout.data} (ZeRO {layout.zero_stage}), run directory {config.run.dir}", flush=True)
    if config.launch.dry_run:
        print(" ".join(command))
        return 0
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # CPU ranks share the machine's cores: split them instead of letting each rank take them all.
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // processes, 1)))
    return run_forwarding_stops(command, env, Path(config.run.dir))


if __name__ == "__main__":
    sys.exit(main())
