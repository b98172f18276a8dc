"""The training loop: build everything from the config, resume if the run directory has a checkpoint,
then step until ``train.max_steps``, logging every step and checkpointing every ``checkpoint.interval``.

Every rank runs this file; rank 0 alone writes the config, the metrics and the progress line.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from bloomtrain import checkpoint as ckpt
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.blend import Blend, read_blend
from bloomtrain.data.loader import BatchLayout, build_train_dataset, load_tokenizer, step_batches
from bloomtrain.distributed import DistributedContext
from bloomtrain.flops import model_flops_per_step, peak_flops
from bloomtrain.metrics import MetricsLogger
from bloomtrain.optim import build_scheduler
from bloomtrain.parallel.engine import TrainingEngine
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.progress import StepProgress

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: BloomTrainConfig, context: DistributedContext, layout: ParallelLayout) -> None:
        self.config, self.context, self.layout = config, context, layout
        train = config.train
        self.run_dir = Path(config.run.dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config))

        self.blend = self._resolve_blend()
        self.tokenizer = load_tokenizer(self.blend.tokenizer)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{config.model.vocab_size}; set model.vocab_size>={self.tokenizer.vocab_size}")
        self.progress = ckpt.TrainingProgress()
        checkpoint = ckpt.latest_checkpoint(self.checkpoints_dir)
        if checkpoint is not None:
            self._check_compatible(checkpoint)

        self.engine = TrainingEngine(config.model, train, config.optimizer, layout, context.device,
                                     config.parallel.activation_checkpointing)
        self.scheduler = build_scheduler(self.engine.optimizer, config.optimizer, train.max_steps)
        if checkpoint is not None:
            self._resume(checkpoint)

        self.batch_layout = BatchLayout(train.micro_batch_size, train.global_batch_size, layout.data,
                                        parallel_state.get_data_parallel_rank())
        total_samples = train.max_steps * train.global_batch_size
        self.dataset = build_train_dataset(self.blend, self.tokenizer, train.seq_length, total_samples,
                                           train.seed, self.run_dir / "data_index")
        self.batches = step_batches(self.dataset, self.batch_layout, self.progress.consumed_samples,
                                    total_samples, config.data.num_workers)
        self.flops_per_step = model_flops_per_step(config.model, train.global_batch_size, train.seq_length)
        self.metrics: MetricsLogger | None = None
        if context.is_main:
            # Measured before W&B starts its service process, which would compete for the cores.
            # Each rank's peak is measured with the threads it has (on CPU the launcher splits the cores
            # between ranks), so the run's peak is that times the number of ranks, as on GPUs.
            self.peak_flops = peak_flops(context.device, DTYPES[train.precision]) * context.world_size
            self.metrics = MetricsLogger(self.run_dir, config.logging.wandb, config.run.name,
                                         dataclasses.asdict(config), self.progress.step, self.progress.wandb_run_id)
            self.progress.wandb_run_id = self.metrics.wandb_run_id
            self.wandb_files = Path(self.metrics.wandb_dir).parent if self.metrics.wandb_dir else None

    def _resolve_blend(self) -> Blend:
        data = self.config.data
        if data.blend is None:
            from data_tools.sample import prepare_sample

            if self.context.is_main:
                logger.info("no data.blend given: using the bundled multilingual sample (cached in %s)",
                            data.cache_dir)
            return read_blend(prepare_sample(data.cache_dir))
        try:
            return read_blend(data.blend)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from None

    def _check_compatible(self, checkpoint: Path) -> None:
        saved_model, _, saved_layout = ckpt.read_meta(checkpoint)
        for field in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "vocab_pad_multiple"):
            saved, wanted = getattr(saved_model, field), getattr(self.config.model, field)
            if saved != wanted:
                raise ConfigError(f"{checkpoint} was written with model.{field}={saved} but the config says "
                                  f"{wanted}; use the same model or a new run.dir")
        current = {"tensor": self.layout.tensor, "pipeline": self.layout.pipeline, "data": self.layout.data}
        if saved_layout != current:
            raise ConfigError(f"{checkpoint} was written under layout {saved_layout}, this run is {current}; "
                              "resume with the same parallel.tensor/pipeline/data")

    def _resume(self, checkpoint: Path) -> None:
        client_state = ckpt.load_checkpoint(self.engine.engine, checkpoint)
        self.scheduler.load_state_dict(client_state["scheduler"])
        _, self.progress, _ = ckpt.read_meta(checkpoint)
        if self.context.is_main:
            logger.info("resumed from %s (step %d, %d samples consumed)", checkpoint, self.progress.step,
                        self.progress.consumed_samples)

    def train(self) -> None:
        train = self.config.train
        progress = self.progress
        display = StepProgress(train.max_steps, progress.step, self.config.logging.interval,
                               enabled=self.context.is_main)
        with display:
            while progress.step < train.max_steps:
                started = time.perf_counter()
                self.scheduler.step(1)  # step k trains with lr(k)
                result = self.engine.train_step(next(self.batches))
                elapsed = time.perf_counter() - started
                progress.step += 1
                progress.consumed_samples += train.global_batch_size
                if self.metrics is not None:
                    metrics = {
                        "loss": result.loss,
                        "lr": self.engine.optimizer.param_groups[0]["lr"],
                        "grad_norm": result.grad_norm,
                        "tokens_per_s": train.global_batch_size * train.seq_length / elapsed,
                        "tflops": self.flops_per_step / elapsed / 1e12,
                        "mfu": self.flops_per_step / elapsed / self.peak_flops,
                        "consumed_samples": progress.consumed_samples,
                    }
                    self.metrics.log(metrics, progress.step)
                    display.update(progress.step, metrics)
                interval = self.config.checkpoint.interval
                if progress.step == train.max_steps or (interval and progress.step % interval == 0):
                    self.save()
        if self.metrics is not None:
            self.metrics.close()
            self._print_summary()

    def save(self) -> Path:
        layout = {"tensor": self.layout.tensor, "pipeline": self.layout.pipeline, "data": self.layout.data}
        return ckpt.save_checkpoint(self.engine.engine, self.checkpoints_dir, self.config.model, layout,
                                    self.progress, {"scheduler": self.scheduler.state_dict()},
                                    keep=self.config.checkpoint.keep)

    def _print_summary(self) -> None:
        latest = ckpt.latest_checkpoint(self.checkpoints_dir)
        lines = [
            f"run directory : {self.run_dir.resolve()}",
            f"metrics       : {(self.run_dir / 'metrics.jsonl').resolve()}",
            f"checkpoint    : {latest.resolve() if latest else '(none)'}",
            f"W&B files     : {self.wandb_files or '(W&B disabled)'}",
        ]
        print("\n".join(lines), file=sys.stdout, flush=True)

