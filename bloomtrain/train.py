"""Per-rank training entry point: ``python -m bloomtrain.train [key=value ...] [group=name ...]``.

Runs as one process on its own. Starting it again with the same ``run.dir`` resumes from that run's
``checkpoints/latest``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from bloomtrain.checkpoint.store import CheckpointError, CheckpointSaveError
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import describe_keys, load_config, to_yaml
from bloomtrain.console import route_library_notices
from bloomtrain.distributed import shutdown_distributed
from bloomtrain.parallel.cpu import apply_cpu_accommodations, prepare_op_builds
from bloomtrain.run_lock import RunDirectoryBusy

USAGE = """usage: python -m bloomtrain.train [key=value ...] [group=name ...]

  python -m bloomtrain.train experiment=quickstart
  python -m bloomtrain.train model=bloom-560m train.precision=bf16 data.blend=/data/roots/blend.json

options:
  --help       this text and every config key with its default
  --cfg        print the composed, validated config and exit

config keys:
"""


def is_collective_failure(error: BaseException) -> bool:
    """gloo and NCCL report a dead or hung peer as a RuntimeError (or torch's DistError) from a collective."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out"))


def first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". This is typically caused")[0][:300]  # gloo's advice that follows is generic


def check_run_dir_writable(run_dir: str) -> None:
    path = Path(run_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"run.dir={run_dir} cannot be written ({error.strerror or error}); choose a directory "
                          "you can write to") from None


def build_trainer(config: BloomTrainConfig):
    """Validate the layout (before anything is written or a process group exists), form the groups, build
    the trainer."""
    import torch

    from bloomtrain.distributed import join_process_group, prepare_environment
    from bloomtrain.parallel.layout import resolve_layout
    from bloomtrain.run_lock import hold_run_directory

    layout = resolve_layout(config, prepare_environment())
    check_run_dir_writable(config.run.dir)
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                          "is False); use train.device=auto or cpu")
    if layout.sequence_parallel:
        # megatron-core overlaps sequence-parallel all-gathers with compute only when CUDA runs kernels
        # in issue order; it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    context = join_process_group(config.train.device, config.distributed.timeout_minutes)
    lock = hold_run_directory(Path(config.run.dir), context.is_main)  # before the run writes anything
    try:
        # Before DeepSpeed and megatron-core are imported: they announce themselves at import time.
        route_library_notices(Path(config.run.dir) / "logs" / f"rank-{context.rank}.log")
        if config.eval.tasks:  # a task name lm-eval does not know stops the run before anything is built
            from bloomtrain.harness.in_training import check_task_names

            check_task_names(config.eval.tasks, config.eval.tasks_include_path)
        apply_cpu_accommodations()
        prepare_op_builds()
        from bloomtrain.build import seed_everything
        from bloomtrain.data.blend import resolve_blend
        from bloomtrain.distributed import init_distributed
        from bloomtrain.parallel.engine import check_precision_supported
        from bloomtrain.parallel.groups import init_parallel_groups
        from bloomtrain.trainer import Trainer

        context = init_distributed(config.train.device, config.distributed.timeout_minutes)
        check_precision_supported(config.train.precision)
        init_parallel_groups(layout, config.distributed.timeout_minutes)
        seed_everything(config.train.seed)
        trainer = Trainer(config, context, layout, resolve_blend(config.data, context.is_main))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.run_lock = lock
    return trainer


def _leave_process_groups(together: bool = True) -> None:
    """megatron-core's groups, then the default one (nothing to leave when the run never formed them)."""
    import torch.distributed as dist

    if dist.is_initialized():
        from bloomtrain.parallel.groups import destroy_parallel_groups

        destroy_parallel_groups()
    shutdown_distributed(together)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(USAGE + describe_keys())
        return 0
    print_only = "--cfg" in args
    overrides = [arg for arg in args if arg != "--cfg"]
    logging.basicConfig(level=os.environ.get("BLOOMTRAIN_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # megatron-core logs every index it builds at INFO; its warnings still come through.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        config = load_config(overrides)
        if print_only:
            print(to_yaml(config))
            return 0
        trainer = build_trainer(config)  # heavy imports only once the config is known to be good
    except ConfigError as error:
        print(f"bloomtrain: config error: {error}", file=sys.stderr)
        _leave_process_groups()
        return 2
    except CheckpointError as error:
        print(f"bloomtrain: checkpoint error: {error}", file=sys.stderr)
        _leave_process_groups()
        return 2
    except RunDirectoryBusy as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"bloomtrain: {error}", file=sys.stderr)
        _leave_process_groups()
        return 2
    status = None
    try:
        status = trainer.train()
        return status
    except CheckpointSaveError as error:
        if trainer.context.is_main:
            print(f"bloomtrain: checkpoint error: {error}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as error:  # found only once measured (eval.metric among the task scores)
        if trainer.context.is_main:
            print(f"bloomtrain: config error: {error}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        print(f"bloomtrain: rank {trainer.context.rank}: a collective failed while {trainer.activity} (step "
              f"{trainer.progress.step + 1}): {first_line(error)}. Another rank died or hung (collectives gave up "
              f"after {trainer.bounds.current:.0f} s, distributed.*); restart the run to resume from its last "
              "checkpoint", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
        # After an error the peers may never reach the exit barrier; leave without it.
        _leave_process_groups(together=status is not None)


if __name__ == "__main__":
    sys.exit(main())
