"""BLOOM's weight-decay groups for AdamW and megatron-core's warm-up + decay LR schedule.

The AdamW itself is built with the DeepSpeed engine (``bloomtrain/parallel/engine.py``).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from bloomtrain.config import OptimizerConfig


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weight matrices decay; biases and LayerNorm parameters (all 1-D) do not.

    ``wd_mult`` is how megatron-core's scheduler scales its weight decay per group.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                    max_steps: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler; call ``step(1)`` before each optimizer step so step k uses lr(k)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.warmup_steps,
        lr_decay_steps=config.decay_steps or max_steps,
        lr_decay_style=config.decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=0,
        wd_incr_style="constant",
    )
