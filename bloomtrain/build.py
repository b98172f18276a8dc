"""What one rank trains with, built from the config: the seeded RNGs, then the model for the layout, its
optimizer, the DeepSpeed engine and the LR schedule, shaped by what the run resumes from (padded
vocabulary, initial weights, a universal checkpoint). The trainer calls it once; benchmarks call it too."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from bloomtrain.checkpoint.manager import ResumePlan
from bloomtrain.config import BloomTrainConfig
from bloomtrain.optim import build_optimizer, build_scheduler
from bloomtrain.parallel.engine import TrainingEngine
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.parallelize import build_parallel_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(config: BloomTrainConfig, layout: ParallelLayout, device: torch.device,
                 resume: ResumePlan) -> tuple[TrainingEngine, OptimizerParamScheduler]:
    model = build_parallel_model(config.model, layout, device, config.train.seed, resume.padded_vocab_size,
                                 config.parallel.activation_checkpointing, resume.initial_weights(),
                                 compile_blocks=config.train.compile)
    optimizer = build_optimizer(model, config.optimizer, config.train.precision, layout.zero_stage)
    engine = TrainingEngine(model, optimizer, config.train, config.optimizer.grad_clip, layout, resume.universal)
    return engine, build_scheduler(engine.optimizer, config.optimizer, config.train.max_steps,
                                   config.train.global_batch_size)
