"""The batch job ``launcher=slurm`` writes and submits (a bare ``srun``'s ranks: ``bloomtrain/distributed.py``).

The job runs one ``bloomtrain.launch`` per node (``srun --ntasks-per-node=1``); each starts torchrun
with a c10d rendezvous on the job's first node, so the ranks are numbered as on one machine. SLURM
signals the batch shell (``--signal=B:USR1@S``) ahead of the time limit; the script passes the
signal to the job step, the ranks stop together with a checkpoint (status 75), and the script puts the
job back in the queue (``scontrol requeue``). The requeued job starts the same command, which resumes
from ``latest``. A SIGTERM (``scancel``, preemption) also stops with a checkpoint, but is never
requeued by the script: a cancelled job stays cancelled, and a preempting cluster requeues by itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.preemption import EXIT_RESUMABLE

JOB_DIR = "slurm"
"""Inside the run directory: the submitted script and one log per job id (appended across requeues)."""

# Keys the per-node command sets itself; the user's values for them would only confuse the reader.
_NODE_KEYS = ("launcher=", "launch.dry_run=", "launch.rendezvous=", "launch.processes=", "launch.nodes=")


def job_script(config: BloomTrainConfig, overrides: list[str], processes: int) -> str:
    """The sbatch script for ``processes`` ranks over ``launch.nodes`` nodes, every override passed on."""
    launch, slurm = config.launch, config.launch.slurm
    run_dir = Path(config.run.dir).resolve()
    log_dir = run_dir / JOB_DIR
    options = {"job-name": slurm.job_name or config.run.name, "nodes": launch.nodes, "ntasks-per-node": 1,
               "output": f"{log_dir}/%j.out", "open-mode": "append",
               "signal": f"B:USR1@{slurm.stop_signal_seconds}"}
    optional = {"partition": slurm.partition, "account": slurm.account, "cpus-per-task": slurm.cpus_per_task,
                "gpus-per-node": slurm.gpus_per_node or None,
                "mem": f"{slurm.mem_gb}G" if slurm.mem_gb else None, "time": slurm.time_minutes}
    options.update({key: value for key, value in optional.items() if value is not None})
    lines = ["#!/bin/bash", f"# Written by bloomtrain.launch for {run_dir}; submit again with: sbatch THIS_FILE"]
    lines += [f"#SBATCH --{key}={shlex.quote(str(value))}" for key, value in options.items()]
    lines += ["#SBATCH --requeue" if slurm.requeue else "#SBATCH --no-requeue"]
    lines += [f"#SBATCH {argument}" for argument in slurm.sbatch_args]
    lines += ["", *slurm.setup, ""] if slurm.setup else [""]
    kept = [item for item in overrides if not item.startswith(_NODE_KEYS)]
    node_command = shlex.join([sys.executable, "-m", "bloomtrain.launch", *kept, "launcher=local",
                               f"launch.processes={processes}", f"launch.nodes={launch.nodes}"])
    lines += [
        f"cd {shlex.quote(os.getcwd())}",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'echo "bloomtrain: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, '
        '$(date -Is)"',
        "stop_signal=''",
        # A trapped signal only interrupts `wait`; the loop passes it to the step and waits again.
        "trap 'stop_signal=USR1' USR1",
        "trap 'stop_signal=TERM' TERM",
        f"srun {node_command} launch.rendezvous=$head:{slurm.rendezvous_port} &",
        "step=$!",
        "forwarded=''",
        "while true; do",
        '  wait "$step"; status=$?',
        '  kill -0 "$step" 2>/dev/null || break',
        '  if [ -n "$stop_signal" ] && [ -z "$forwarded" ]; then kill -"$stop_signal" "$step"; forwarded=1; fi',
        "done",
        'echo "bloomtrain: training ended with status $status ($(date -Is))"',
    ]
    if slurm.requeue:
        lines += [
            f'if [ "$status" = {EXIT_RESUMABLE} ] && [ "$stop_signal" != TERM ]; then',
            '  echo "bloomtrain: stopped with a checkpoint; requeueing job $SLURM_JOB_ID to resume"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def submit(config: BloomTrainConfig, overrides: list[str], processes: int) -> str:
    """Write ``RUN_DIR/slurm/job.sh``, submit it with sbatch; returns the job id."""
    log_dir = Path(config.run.dir).resolve() / JOB_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / "job.sh"
    script.write_text(job_script(config, overrides, processes))
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("launcher=slurm: sbatch is not on PATH; run on a SLURM login node "
                          f"(the job script is in {script})") from None
    if result.returncode:
        raise ConfigError(f"launcher=slurm: sbatch refused {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
