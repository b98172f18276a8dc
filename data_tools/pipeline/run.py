"""Running the stages: locally with worker processes, or on SLURM as submitit job arrays.

Locally, each stage's tasks that have no completion marker run ``executor.workers`` at a time, and the
next stage starts when all of them are done. On SLURM every unfinished stage is submitted at once, each
array depending on the one before (``pipeline/slurm.py``). A task leaves its marker only after its
outputs are renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from data_tools.errors import DataError
from data_tools.pipeline.config import PipelineConfig
from data_tools.pipeline.stages import STAGES, Processed, TaskFailed, marker, run_task, work_dir
from data_tools.steps.read import InputError, InputShard, expand_inputs, plan_shards


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
    """Run (or submit, with executor=slurm executor.wait=false) every unfinished task; returns the shards."""
    from data_tools.pipeline import slurm

    slurm.refuse_while_running(config)
    shards = prepare(config)
    pending = []
    for stage, _, kind in STAGES:
        tasks = list(range(len(shards))) if kind == "per_input" else [0]
        unfinished = [task for task in tasks if not marker(config, stage, task).exists()]
        if unfinished:
            pending.append((stage, unfinished))
    if config.executor.name == "slurm":
        if pending or not config.executor.wait:
            submitted = slurm.submit(config, pending, shards)
            if config.executor.wait:
                slurm.follow(submitted)
        return shards
    for stage, tasks in pending:
        _run_locally(stage, config, tasks, shards, show_progress)
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
                with _naming_the_task(stage, task, config):
                    advance(run_task(stage, config, task, shards))
            return
        with ProcessPoolExecutor(max_workers=min(config.executor.workers, len(tasks))) as pool:
            futures = {pool.submit(run_task, stage, config, task, shards): task for task in tasks}
            for future in as_completed(futures):
                with _naming_the_task(stage, futures[future], config):
                    advance(future.result())


@contextlib.contextmanager
def _naming_the_task(stage: str, task: int, config: PipelineConfig) -> Iterator[None]:
    """Any failure of a task becomes one line: a DataError's own message (it names the key to change),
    anything else its last line with the traceback written to work/errors/ for whoever debugs it."""
    try:
        yield
    except DataError as error:
        raise TaskFailed(f"stage {stage}, task {task} failed: {error}. Rerun the same command after the fix "
                         "(finished tasks are kept)") from None
    except Exception as error:
        log = work_dir(config) / "errors" / f"{stage}-{task:05d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)))
        message = (str(error).strip().splitlines() or [""])[0]
        raise TaskFailed(f"stage {stage}, task {task} failed: {type(error).__name__}: {message} (traceback: "
                         f"{log}); fix the cause and rerun the same command (finished tasks are kept)") from None
