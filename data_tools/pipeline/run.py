"""Running the stages: locally with worker processes, or on SLURM as submitit job arrays.

Each stage's tasks that have no completion marker are run (``executor.workers`` at a time); the next
stage starts when all of them are done, which is also what orders SLURM's arrays (clustering waits for
every signature). A task leaves its marker only after its outputs are renamed into place.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from data_tools.pipeline.config import PipelineConfig
from data_tools.pipeline.stages import STAGES, Processed, marker, work_dir
from data_tools.steps.read import InputError, InputShard, expand_inputs, plan_shards

STAGE_FUNCTIONS = {name: function for name, function, _ in STAGES}


def run_task(stage: str, config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    """One task of one stage, then its completion marker; returns what it processed."""
    processed = STAGE_FUNCTIONS[stage](config, task, shards)
    done = marker(config, stage, task)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return processed


def prepare(config: PipelineConfig) -> list[InputShard]:
    """Resolve the inputs into shards and check them against what this output directory was started with."""
    files = expand_inputs(list(config.input.paths))
    shards = plan_shards(files, int(config.input.shard_megabytes * 1e6))
    record = work_dir(config) / "shards.json"
    listed = [shard.to_json() for shard in shards]
    if record.exists() and json.loads(record.read_text()) != listed:
        raise InputError(f"output.dir={config.output.dir} holds a run over other inputs (or another "
                         "input.shard_megabytes); use a new output.dir (or delete it) to process these")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(listed, indent=1))
    return shards


def run_pipeline(config: PipelineConfig, show_progress: bool = True) -> list[InputShard]:
    shards = prepare(config)
    for stage, _, kind in STAGES:
        tasks = list(range(len(shards))) if kind == "per_input" else [0]
        pending = [task for task in tasks if not marker(config, stage, task).exists()]
        if not pending:
            continue
        if config.executor.name == "slurm":
            _run_on_slurm(stage, config, pending, shards)
        else:
            _run_locally(stage, config, pending, shards, show_progress)
    return shards


def _run_locally(stage: str, config: PipelineConfig, tasks: list[int], shards: list[InputShard],
                 show: bool) -> None:
    started = time.perf_counter()
    documents = nbytes = 0
    with tqdm(total=len(tasks), desc=f"{stage:9}", unit="task", disable=not show, leave=True) as bar:
        def advance(processed: Processed) -> None:
            nonlocal documents, nbytes
            documents, nbytes = documents + processed.documents, nbytes + processed.bytes
            bar.update(1)
            elapsed = time.perf_counter() - started
            rates = ([f"{documents / elapsed:,.0f} docs/s"] if documents else []) + \
                ([f"{nbytes / 1e6 / elapsed:.1f} MB/s"] if nbytes else [])
            if rates:
                bar.set_postfix_str(", ".join(rates))

        if config.executor.workers == 1 or len(tasks) == 1:
            for task in tasks:
                advance(run_task(stage, config, task, shards))
            return
        with ProcessPoolExecutor(max_workers=min(config.executor.workers, len(tasks))) as pool:
            futures = [pool.submit(run_task, stage, config, task, shards) for task in tasks]
            for future in as_completed(futures):
                advance(future.result())


def _run_on_slurm(stage: str, config: PipelineConfig, tasks: list[int], shards: list[InputShard]) -> None:
    import submitit

    settings = config.executor
    executor = submitit.AutoExecutor(folder=str(work_dir(config) / "slurm" / "%j"), cluster=settings.cluster)
    executor.update_parameters(timeout_min=settings.time_minutes, cpus_per_task=settings.cpus_per_task,
                               mem_gb=settings.mem_gb, slurm_array_parallelism=settings.workers,
                               name=f"bloomtrain-data-{stage}")
    if settings.partition and executor.cluster == "slurm":
        executor.update_parameters(slurm_partition=settings.partition)
    jobs = executor.map_array(run_task, [stage] * len(tasks), [config] * len(tasks), tasks, [shards] * len(tasks))
    for job in tqdm(jobs, desc=f"{stage:9}", unit="task"):
        job.result()  # raises with the task's own traceback if it failed
