"""``python -m bloomtrain.launch [key=value ...]``: read the config, work out the processes, start them.

Reads the same config as ``bloomtrain.train``, works out how many processes the layout needs
(tensor x pipeline x data; ``parallel.data=auto`` fills the visible GPUs, or is 1 on a CPU machine,
unless ``launch.processes`` says otherwise) and starts them with torchrun on this machine
(``local.py``), every override passed on unchanged. ``launch.dry_run=true`` prints the plan (memory per
GPU, tokens, steps and days, ``bloomtrain/plan/``) and the command, and starts nothing.
``launcher=slurm`` instead writes and submits a SLURM job that runs this launcher on every node
(``slurm.py``); with ``launch.rendezvous=HOST:PORT`` the nodes' torchruns meet there.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.console import route_library_notices
from bloomtrain.launch.local import run_forwarding_stops, torchrun_command
from bloomtrain.parallel.cpu import threads_per_rank
from bloomtrain.parallel.layout import process_count, resolve_layout


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    route_library_notices()  # the plan of a dry run imports DeepSpeed
    try:
        config = load_config(overrides)
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
    return run_forwarding_stops(command, env, Path(config.run.dir), launch.hang_warning_minutes,
                                launch.hang_warning_factor)


def _submit_to_slurm(config: BloomTrainConfig, overrides: list[str], processes: int, plan: str) -> int:
    from bloomtrain.launch import slurm

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
