"""The training loop: build everything from the config, resume if the run directory has a checkpoint,
then step until ``train.max_steps``, logging every step and checkpointing every ``checkpoint.interval``.

Building follows one order: the checkpoint manager decides what the run starts from (``plan_resume``),
the model is built for the layout from that plan (``parallel/parallelize.py``), then the optimizer, the
DeepSpeed engine and the LR schedule, and ``restore`` fills them and returns where training stands.

Every rank runs this file; rank 0 alone writes the config, the metrics and the progress line.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.checkpoint.manager import CheckpointManager, ResumePlan
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.blend import Blend
from bloomtrain.data.loader import BatchLayout, build_train_dataset, load_tokenizer, step_batches
from bloomtrain.distributed import DistributedContext
from bloomtrain.flops import model_flops_per_step, peak_flops
from bloomtrain.metrics import MetricsLogger
from bloomtrain.optim import build_optimizer, build_scheduler
from bloomtrain.parallel.engine import TrainingEngine
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.parallelize import build_parallel_model
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, StopRequests
from bloomtrain.progress import StepProgress, notify, print_summary

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(config: BloomTrainConfig, layout: ParallelLayout, device: torch.device,
                 resume: ResumePlan) -> tuple[TrainingEngine, OptimizerParamScheduler]:
    """This rank's model for the layout, its optimizer, the DeepSpeed engine and the LR schedule, shaped
    by what the run resumes from (padded vocabulary, initial weights, a universal checkpoint)."""
    model = build_parallel_model(config.model, layout, device, config.train.seed, resume.padded_vocab_size,
                                 config.parallel.activation_checkpointing, resume.initial_weights())
    optimizer = build_optimizer(model, config.optimizer, config.train.precision, layout.zero_stage)
    engine = TrainingEngine(model, optimizer, config.train, config.optimizer.grad_clip, layout, resume.universal)
    return engine, build_scheduler(engine.optimizer, config.optimizer, config.train.max_steps)


class Trainer:
    def __init__(self, config: BloomTrainConfig, context: DistributedContext, layout: ParallelLayout,
                 blend: Blend) -> None:
        self.config, self.context, self.layout, self.blend = config, context, layout, blend
        train = config.train
        self.stops = StopRequests(train.exit_duration_minutes)
        self.run_dir = Path(config.run.dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config))

        self.tokenizer = load_tokenizer(blend.tokenizer)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{config.model.vocab_size}; set model.vocab_size>={self.tokenizer.vocab_size}")

        self.checkpoints = CheckpointManager(config.checkpoint, self.run_dir, layout, config.model, blend.tokenizer,
                                             run_config_yaml=to_yaml(config))
        resume = self.checkpoints.plan_resume()
        self.engine, self.scheduler = build_engine(config, layout, context.device, resume)
        self.progress = self.checkpoints.restore(resume, self.engine.engine, self.scheduler)

        self.batch_layout = BatchLayout(train.micro_batch_size, train.global_batch_size, layout.data,
                                        parallel_state.get_data_parallel_rank())
        total_samples = train.max_steps * train.global_batch_size
        self.dataset = build_train_dataset(blend, self.tokenizer, train.seq_length, total_samples,
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

    def train(self) -> int:
        """Train to ``train.max_steps``; returns the process exit status (0, or EXIT_RESUMABLE after a stop)."""
        train = self.config.train
        status = 0
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
                progress.consumed_tokens += train.global_batch_size * train.seq_length
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
                saved = progress.step == train.max_steps or bool(interval and progress.step % interval == 0)
                if saved:
                    self.save()
                reason = self.stops.agreed_reason(self.context.device)
                if reason is not None and progress.step < train.max_steps:
                    if not saved:
                        self.save()
                    if self.context.is_main:
                        record = {"step": progress.step, "reason": reason, "exit_status": EXIT_RESUMABLE}
                        (self.run_dir / STOP_RECORD).write_text(json.dumps(record) + "\n")
                        notify(f"stopped after step {progress.step} ({reason}); checkpoint saved, "
                               f"exiting with status {EXIT_RESUMABLE} so the job can be requeued")
                    status = EXIT_RESUMABLE
                    break
        self.stops.restore()
        if self.metrics is not None:
            self.metrics.close()
            self._print_summary()
        return status

    def save(self) -> Path:
        return self.checkpoints.save(self.engine.engine, self.scheduler, self.progress)

    def _print_summary(self) -> None:
        latest = latest_checkpoint(self.checkpoints_dir)
        print_summary({
            "run directory": str(self.run_dir.resolve()),
            "metrics": str((self.run_dir / "metrics.jsonl").resolve()),
            "checkpoint": str(latest.resolve()) if latest else "(none)",
            "W&B files": str(self.wandb_files or "(W&B disabled)"),
        })

