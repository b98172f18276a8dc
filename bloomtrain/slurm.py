"""Speaking SLURM: the batch job ``launcher=slurm`` submits, and SLURM's task variables under a bare ``srun``.

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


def rank_environment() -> dict[str, str] | None:
    """torch.distributed's variables from SLURM's under a bare ``srun python -m bloomtrain.train``
    (None elsewhere): rank = SLURM_PROCID, world = the step's tasks, master = the step's first node."""
    if "SLURM_STEP_NUM_TASKS" not in os.environ or "SLURM_PROCID" not in os.environ:
        return None
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    listed = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
    head = listed.stdout.split()[0] if listed.returncode == 0 and listed.stdout.split() else "127.0.0.1"
    # Every task of a step must pick the same port without talking to each other: derive it from the ids.
    job, step = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0"))
    port = os.environ.get("MASTER_PORT") or str(20000 + (job * 16 + step) % 30000)
    return {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"), "MASTER_ADDR": os.environ.get("MASTER_ADDR", head),
            "MASTER_PORT": port}
