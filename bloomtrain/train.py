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
from typing import TYPE_CHECKING

from bloomtrain.checkpoint.store import CheckpointError, CheckpointSaveError
from bloomtrain.config import BloomTrainConfig, ConfigError, DataConfig
from bloomtrain.config_loader import describe_keys, load_config, to_yaml
from bloomtrain.distributed import shutdown_distributed
from bloomtrain.parallel.cpu import apply_cpu_accommodations

if TYPE_CHECKING:
    from bloomtrain.data.blend import Blend

USAGE = """usage: python -m bloomtrain.train [key=value ...] [group=name ...]

  python -m bloomtrain.train experiment=quickstart
  python -m bloomtrain.train model=bloom-560m train.precision=bf16 data.blend=/data/roots/blend.json

options:
  --help       this text and every config key with its default
  --cfg        print the composed, validated config and exit

config keys:
"""


def resolve_blend(data: DataConfig, is_main: bool) -> Blend:
    """The run's blend: ``data.blend``, or with none the bundled sample, prepared on first use.

    The sample is the entry point's business: preparing it trains a tokenizer with the data tools,
    which the ``bloomtrain`` library itself never imports.
    """
    from bloomtrain.data.blend import read_blend

    if data.blend is None:
        from data_tools.sample import prepare_sample

        if is_main:
            logging.getLogger(__name__).info("no data.blend given: using the bundled multilingual sample "
                                             "(cached in %s)", data.cache_dir)
        return read_blend(prepare_sample(data.cache_dir))
    try:
        return read_blend(data.blend)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None


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
    """Validate the layout (before any process group exists), form the groups, build the trainer."""
    apply_cpu_accommodations()  # first: megatron-core warns at import time
    import torch

    from bloomtrain.distributed import init_distributed, prepare_environment
    from bloomtrain.parallel.engine import check_precision_supported
    from bloomtrain.parallel.groups import init_parallel_groups
    from bloomtrain.parallel.layout import resolve_layout
    from bloomtrain.trainer import Trainer, seed_everything

    layout = resolve_layout(config, prepare_environment())
    check_run_dir_writable(config.run.dir)
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                          "is False); use train.device=auto or cpu")
    if layout.sequence_parallel:
        # megatron-core overlaps sequence-parallel all-gathers with compute only when CUDA runs kernels
        # in issue order; it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    context = init_distributed(config.train.device, config.distributed.timeout_minutes)
    check_precision_supported(config.train.precision)
    init_parallel_groups(layout, config.distributed.timeout_minutes)
    seed_everything(config.train.seed)
    return Trainer(config, context, layout, resolve_blend(config.data, context.is_main))


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
        shutdown_distributed()
        return 2
    except CheckpointError as error:
        print(f"bloomtrain: checkpoint error: {error}", file=sys.stderr)
        shutdown_distributed()
        return 2
    status = None
    try:
        status = trainer.train()
        return status
    except CheckpointSaveError as error:
        if trainer.context.is_main:
            print(f"bloomtrain: checkpoint error: {error}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        print(f"bloomtrain: rank {trainer.context.rank}: a collective failed while {trainer.activity} (step "
              f"{trainer.progress.step + 1}): {first_line(error)}. Another rank died or hung (collectives give up "
              f"after distributed.timeout_minutes={config.distributed.timeout_minutes:g}); restart the run to "
              "resume from its last checkpoint", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
        # After an error the peers may never reach the exit barrier; leave without it.
        shutdown_distributed(together=status is not None)


if __name__ == "__main__":
    sys.exit(main())
