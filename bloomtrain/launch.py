"""Start a training run: ``python -m bloomtrain.launch [key=value ...]``.

Reads the same config as ``bloomtrain.train``, works out how many processes the layout needs
(tensor x pipeline x data; ``parallel.data=auto`` fills the visible GPUs, or is 1 on a CPU machine,
unless ``launch.processes`` says otherwise) and starts them with torchrun on this machine, every
override passed on unchanged. ``launch.dry_run=true`` prints the plan and starts nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config


def process_count(config: BloomTrainConfig) -> int:
    parallel = config.parallel
    model_parallel = parallel.tensor * parallel.pipeline
    if config.launch.processes is not None:
        return config.launch.processes
    if parallel.data != "auto":
        return model_parallel * int(parallel.data)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(devices // model_parallel, 1) * model_parallel


def torchrun_command(processes: int, overrides: list[str]) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "bloomtrain.train", *overrides]


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
    command = torchrun_command(processes, overrides)
    print(f"bloomtrain.launch: {processes} processes = tensor {layout.tensor} x pipeline {layout.pipeline} x "
          f"data {layout.data} (ZeRO {layout.zero_stage}), run directory {config.run.dir}", flush=True)
    if config.launch.dry_run:
        print(" ".join(command))
        return 0
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # CPU ranks share the machine's cores: split them instead of letting each rank take them all.
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // processes, 1)))
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
