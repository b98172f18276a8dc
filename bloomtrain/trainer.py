"""The training loop: build everything from the config, resume if the run directory has a checkpoint,
then step until ``train.max_steps``, logging every step and checkpointing every ``checkpoint.interval``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bloomtrain import checkpoint as ckpt
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.blend import read_blend
from bloomtrain.data.loader import BatchLayout, build_train_dataset, load_tokenizer, step_batches
from bloomtrain.distributed import init_distributed
from bloomtrain.flops import model_flops_per_step, peak_flops
from bloomtrain.metrics import MetricsLogger
from bloomtrain.model import build_model
from bloomtrain.optim import build_optimizer, build_scheduler
from bloomtrain.progress import StepProgress

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: BloomTrainConfig) -> None:
        self.config = config
        train = config.train
        if (config.parallel.tensor, config.parallel.pipeline) != (1, 1) or config.parallel.data not in ("auto", "1"):
            raise ConfigError("parallel.tensor/pipeline/data > 1 need the 3D-parallel engine, which this "
                              "release does not have yet; train with parallel.tensor=1 parallel.pipeline=1")
        self.context = init_distributed(train.device)
        self.device = self.context.device
        self.dtype = DTYPES[train.precision]
        self.run_dir = Path(config.run.dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(config))
        seed_everything(train.seed)

        self.blend = self._resolve_blend()
        self.tokenizer = load_tokenizer(self.blend.tokenizer)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{config.model.vocab_size}; set model.vocab_size>={self.tokenizer.vocab_size}")

        self.model = build_model(config.model, self.device, seed=train.seed)
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.optimizer, train.max_steps)
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.progress = self._maybe_resume()

        self.layout = BatchLayout(train.micro_batch_size, train.global_batch_size)
        total_samples = train.max_steps * train.global_batch_size
        self.dataset = build_train_dataset(self.blend, self.tokenizer, train.seq_length, total_samples,
                                           train.seed, self.run_dir / "data_index")
        self.batches = step_batches(self.dataset, self.layout, self.progress.consumed_samples,
                                    total_samples, config.data.num_workers)
        # Measured before W&B starts its service process, which would compete for the cores.
        self.peak_flops = peak_flops(self.device, self.dtype)
        self.metrics = MetricsLogger(self.run_dir, config.logging.wandb, config.run.name,
                                     dataclasses.asdict(config), self.progress.step, self.progress.wandb_run_id)
        self.progress.wandb_run_id = self.metrics.wandb_run_id
        self.wandb_files = Path(self.metrics.wandb_dir).parent if self.metrics.wandb_dir else None
        self.flops_per_step = model_flops_per_step(config.model, train.global_batch_size, train.seq_length)

    def _resolve_blend(self):
        data = self.config.data
        if data.blend is None:
            from data_tools.sample import prepare_sample

            logger.info("no data.blend given: using the bundled multilingual sample (cached in %s)", data.cache_dir)
            return read_blend(prepare_sample(data.cache_dir))
        try:
            return read_blend(data.blend)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from None

    def _maybe_resume(self) -> ckpt.TrainingProgress:
        checkpoint = ckpt.latest_checkpoint(self.checkpoints_dir)
        if checkpoint is None:
            return ckpt.TrainingProgress()
        saved_model, progress = ckpt.read_meta(checkpoint)
        for field in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "vocab_pad_multiple"):
            saved, wanted = getattr(saved_model, field), getattr(self.config.model, field)
            if saved != wanted:
                raise ConfigError(f"{checkpoint} was written with model.{field}={saved} but the config says "
                                  f"{wanted}; use the same model or a new run.dir")
        self.model.load_state_dict(ckpt.load_model_weights(checkpoint))
        state = ckpt.load_trainer_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        logger.info("resumed from %s (step %d, %d samples consumed)", checkpoint, progress.step,
                    progress.consumed_samples)
        return progress

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Forward/backward every micro-batch, then one optimizer step. Returns (mean loss, grad norm)."""
        self.model.train()
        self.scheduler.step(1)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else nullcontext())
        total_loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            with autocast:
                logits = self.model(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            self.grad_scaler.scale(loss / len(micro_batches)).backward()
            total_loss += loss.detach()
        self.grad_scaler.unscale_(self.optimizer)
        clip = self.config.optimizer.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return (total_loss / len(micro_batches)).item(), grad_norm.item()

    def train(self) -> None:
        train = self.config.train
        progress = self.progress
        display = StepProgress(train.max_steps, progress.step, self.config.logging.interval)
        with display:
            while progress.step < train.max_steps:
                started = time.perf_counter()
                loss, grad_norm = self.train_step(next(self.batches))
                elapsed = time.perf_counter() - started
                progress.step += 1
                progress.consumed_samples += train.global_batch_size
                metrics = {
                    "loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
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
        self.metrics.close()
        self._print_summary()

    def save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "grad_scaler": self.grad_scaler.state_dict()}
        return ckpt.save_checkpoint(self.checkpoints_dir, self.model, self.config.model, self.progress, state,
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
