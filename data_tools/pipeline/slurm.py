"""The pipeline on SLURM: every unfinished stage is submitted at once, as a submitit job array that
waits for the previous stage's array (``--dependency=afterok``; clustering waits for every signature),
so the cluster runs the whole pipeline without the submitting process. That process follows the jobs
and prints the report (``executor.wait=true``), or returns at once and a last job writes the report.

A failed task leaves the stages after it unsatisfiable, and SLURM cancels them (``--kill-on-invalid-dep``);
rerunning the same command redoes only what is unfinished. While jobs of an earlier submission are still
queued or running, a rerun on the same ``output.dir`` refuses to start instead of doing their work twice.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tqdm import tqdm

from data_tools.pipeline.config import PipelineConfig
from data_tools.pipeline.stages import TaskFailed, run_task, work_dir
from data_tools.steps.read import InputError, InputShard


def _record(config: PipelineConfig) -> Path:
    return work_dir(config) / "slurm" / "submitted.json"


def refuse_while_running(config: PipelineConfig) -> None:
    """Stop before any work if this output directory's earlier SLURM jobs are still queued or running."""
    record = _record(config)
    if not record.exists():
        return
    try:
        listed = subprocess.run(["squeue", "--noheader", "--format=%F"], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return  # no SLURM here (a local run of a directory once processed on a cluster)
    if listed.returncode:
        raise InputError(f"output.dir={config.output.dir} was processed by SLURM jobs, and squeue cannot tell "
                         f"whether they still run ({listed.stderr.strip()}); rerun when the controller answers")
    active = set(listed.stdout.split()) & set(json.loads(record.read_text())["jobs"])
    if active:
        jobs = ",".join(sorted(active))
        raise InputError(f"output.dir={config.output.dir} is still being processed by SLURM jobs {jobs} "
                         f"(squeue -j {jobs}); wait for them, or scancel {jobs.replace(',', ' ')}, then rerun")


def submit(config: PipelineConfig, pending: list[tuple[str, list[int]]], shards: list[InputShard]) -> list:
    """Submit each (stage, tasks) as an array after the previous one; with executor.wait=false also the
    report. Returns [(stage, jobs)]. Without SLURM (submitit's local or debug cluster, which know no
    dependencies) each stage is followed to its end before the next is submitted."""
    settings = config.executor
    previous: str | None = None
    submitted, job_ids = [], []
    for stage, tasks in pending:
        executor = _executor(config, stage, previous)
        jobs = executor.map_array(run_task, [stage] * len(tasks), [config] * len(tasks), tasks,
                                  [shards] * len(tasks))
        job_ids.append(jobs[0].job_id.split("_")[0])
        if executor.cluster == "slurm":
            previous = job_ids[-1]
            submitted.append((stage, jobs))
        else:
            follow([(stage, jobs)])
    if not settings.wait:
        report = _executor(config, "report", previous).submit(write_and_print_report, config, len(shards))
        submitted.append(("report", [report]))
        job_ids.append(report.job_id)
    record = _record(config)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"jobs": job_ids}))
    if not settings.wait:
        stages = ", ".join(f"{stage} {jobs[0].job_id.split('_')[0]} ({len(jobs)} task{'s' * (len(jobs) > 1)})"
                           for stage, jobs in submitted)
        print(f"data_tools.pipeline: submitted, each after the one before: {stages}\n  follow: squeue -j "
              f"{','.join(job_ids)}; logs: {work_dir(config) / 'slurm'}; the report job writes "
              f"{config.output.dir}/report/")
    return submitted


def _executor(config: PipelineConfig, stage: str, after: str | None):
    import submitit

    settings = config.executor
    executor = submitit.AutoExecutor(folder=str(work_dir(config) / "slurm" / "%j"), cluster=settings.cluster)
    if executor.cluster != "slurm" and not settings.wait:
        raise InputError(f"executor.wait=false needs SLURM (executor.cluster={settings.cluster} runs jobs "
                         "only while this process lives)")
    executor.update_parameters(timeout_min=settings.time_minutes, cpus_per_task=settings.cpus_per_task,
                               mem_gb=settings.mem_gb, slurm_array_parallelism=settings.workers,
                               name=f"bloomtrain-data-{stage}")
    if executor.cluster == "slurm":
        if settings.partition:
            executor.update_parameters(slurm_partition=settings.partition)
        if after:
            executor.update_parameters(
                slurm_additional_parameters={"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
    return executor


def follow(submitted: list) -> None:
    """Wait for the jobs stage by stage with a progress bar; a failure raises TaskFailed."""
    from submitit.core.utils import UncompletedJobError

    for stage, jobs in submitted:
        for task, job in enumerate(tqdm(jobs, desc=f"{stage:9}", unit="task")):
            try:
                job.result()
            except UncompletedJobError as error:
                raise TaskFailed(
                    f"stage {stage}, task {task} failed on SLURM (job {job.job_id}, log {job.paths.stderr}): "
                    f"{_last_error_line(str(error))}; SLURM cancels the stages after it. Fix the cause and rerun "
                    "the same command: finished tasks are kept") from None


def _last_error_line(text: str) -> str:
    """The exception's own line from a job's traceback (``Type: message``), without the module path."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b.*:", line)]
    line = raised[-1] if raised else (lines[-1] if lines else "no message")
    return re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", line)


def write_and_print_report(config: PipelineConfig, shard_count: int) -> None:
    from data_tools.pipeline.report import table, write_report

    print(table(write_report(config, shard_count)))
