"""Training on SLURM: the job ``launcher=slurm`` submits (checked as text, then run on a real one-node
SLURM: stopped by the time-limit signal, requeued, resumed to the end) and bare ``srun`` ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bloomtrain.config import ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.launch.slurm import job_script
from bloomtrain.metrics import read_metrics
from bloomtrain.parallel.layout import process_count
from tests.conftest import REPO, run_torchrun, tiny_run

STEPS = 40


def _overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_run(run_dir, cache, f"train.max_steps={STEPS}", "checkpoint.interval=0", "parallel.data=2", *extra)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _job(job_id: str) -> dict[str, str]:
    """The job's fields from ``scontrol show job`` (squeue hides a job while it is REQUEUED, between its
    runs, and a busy controller may not answer at once: both retried here)."""
    for _ in range(30):
        shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
        if shown.returncode == 0 and "JobState=" in shown.stdout:
            return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
        time.sleep(1)
    raise AssertionError(f"scontrol show job {job_id}: {shown.stderr.strip()}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sample_cache) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_torchrun(2, _overrides(run_dir, sample_cache))
    return read_metrics(run_dir)


def test_job_script_runs_one_launcher_per_node_and_requeues_after_a_stop():
    overrides = ["launcher=slurm", "launch.nodes=2", "launch.slurm.gpus_per_node=8", "parallel.tensor=4",
                 "train.global_batch_size=64", "launch.slurm.partition=gpu", "launch.slurm.time_minutes=1200",
                 "launch.slurm.setup=[module load cuda/12.4]", "launch.slurm.sbatch_args=['--qos=high']",
                 "run.dir=/scratch/run one"]
    config = load_config(overrides)
    assert process_count(config) == 16  # data=auto: 2 nodes x 8 GPUs over tensor 4
    script = job_script(config, overrides, process_count(config)).splitlines()
    for option in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=1200",
                   "--signal=B:USR1@300", "--requeue", "--qos=high", "--open-mode=append"]:
        assert f"#SBATCH {option}" in script
    assert "#SBATCH --output='/scratch/run one/slurm/%j.out'" in script
    assert script.index("module load cuda/12.4") < next(i for i, line in enumerate(script) if line.startswith("srun"))
    srun = next(line for line in script if line.startswith("srun"))
    assert srun.endswith("launcher=local launch.processes=16 launch.nodes=2 launch.rendezvous=$head:29500 &")
    assert "'run.dir=/scratch/run one'" in srun and "launcher=slurm" not in srun
    assert 'if [ "$status" = 75 ] && [ "$stop_signal" != TERM ]; then' in script

    no_requeue = job_script(load_config([*overrides, "launch.slurm.requeue=false"]), overrides, 16)
    assert "scontrol requeue" not in no_requeue and "#SBATCH --no-requeue" in no_requeue


@pytest.mark.parametrize("overrides, named", [
    (["launcher=slurm"], "launch.slurm.gpus_per_node"),  # data=auto on CPU nodes: nothing to count
    (["launch.nodes=2"], "launch.rendezvous"),
    (["launcher=sbatch"], "launcher='sbatch'"),
    (["launcher=slurm", "launch.processes=3", "launch.nodes=2"], "launch.nodes=2"),
    (["launch.slurm.sbatch_args=[qos=high]"], "launch.slurm.sbatch_args"),
])
def test_bad_slurm_settings_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace(".", r"\.")):
        process_count(load_config(overrides))


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_slurm_job_stops_on_the_time_limit_signal_requeues_and_resumes_exactly(
        local_slurm, sample_cache, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    submitted = subprocess.run(
        [sys.executable, "-m", "bloomtrain.launch", "launcher=slurm", f"launch.slurm.partition={local_slurm}",
         "launch.slurm.cpus_per_task=2", *_overrides(run_dir, sample_cache)],
        cwd=REPO, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.split("submitted SLURM job ")[1].split(":")[0]
    log = run_dir / "slurm" / f"{job_id}.out"

    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 3:
        state = _job(job_id)["JobState"]
        assert time.monotonic() < deadline and state not in FINAL_STATES, \
            f"job {job_id} {state}:\n" + (log.read_text() if log.exists() else "no log")
        time.sleep(0.2)
    # What --signal=B:USR1@300 does ahead of the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    hold_lifted = False
    while (job := _job(job_id))["JobState"] not in FINAL_STATES or job["Restarts"] == "0":
        assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']}:\n{log.read_text()}"
        if (job["JobState"], job["Reason"]) == ("PENDING", "BeginTime") and not hold_lifted:
            # Requeued: SLURM holds it ~2 minutes; start it in 3 s instead. Not at once: slurmd refuses a
            # job credential issued in the same second as the one the requeue revoked.
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now+3"], check=True)
            hold_lifted = True
        time.sleep(0.5)

    text = log.read_text()
    assert job["JobState"] == "COMPLETED", f"job {job_id} {job['JobState']}:\n{text[-3000:]}"
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed and 3 <= int(resumed.group(1)) < STEPS, text[-3000:]
    assert f"job {job_id}, restart 0" in text and f"job {job_id}, restart 1" in text
    assert "training ended with status 75" in text and "requeueing job" in text
    assert "training ended with status 0" in text.strip().splitlines()[-1]
    got = read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for resumed, reference in zip(got, uninterrupted, strict=True):
        assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=0), resumed["step"]
        assert resumed["consumed_samples"] == reference["consumed_samples"]


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_bare_srun_ranks_train_from_slurm_variables(local_slurm, sample_cache, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    subprocess.run(["srun", f"--partition={local_slurm}", "--ntasks=2", "--cpus-per-task=1", "--time=10",
                    sys.executable, "-m", "bloomtrain.train", *_overrides(run_dir, sample_cache)],
                   cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=600)
    got = read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in uninterrupted], rel=1e-6, abs=0)
