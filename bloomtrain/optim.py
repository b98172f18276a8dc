"""The optimizer and LR schedule from their config slices: AdamW with BLOOM's weight-decay groups
(clipping by the global norm where DeepSpeed does not clip, see ``parallel/clipping.py``) and
megatron-core's warm-up + decay schedule. DeepSpeed's engine wraps the optimizer (``parallel/engine.py``).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from bloomtrain.config import OptimizerConfig
from bloomtrain.parallel.clipping import AdamWWithGlobalClipping, deepspeed_clips


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weight matrices decay; biases and LayerNorm parameters (all 1-D) do not.

    ``wd_mult`` is how megatron-core's scheduler scales its weight decay per group.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def build_optimizer(model: nn.Module, config: OptimizerConfig, precision: str,
                    zero_stage: int) -> torch.optim.Optimizer:
    """AdamW over ``model``'s decay groups; it clips by the global norm itself when DeepSpeed does not."""
    # fused: one pass over each tensor, no temporaries (torch's unfused update allocates two the size of
    # the parameters; on a 110M flat ZeRO partition that was 0.5 s of a 16 s CPU step, docs/benchmarks.md).
    adam = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay,
                fused=True)
    if deepspeed_clips(precision, zero_stage):
        return torch.optim.AdamW(parameter_groups(model), **adam)
    return AdamWWithGlobalClipping(parameter_groups(model), config.grad_clip, **adam)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, max_steps: int,
                    global_batch_size: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler, counting samples as Megatron does with a batch ramp-up: warm-up and decay
    last ``warmup_steps`` and ``decay_steps`` full global batches. Call ``step(batch)`` before each optimizer
    step so step k uses lr(k); with a constant batch the LR of every step is what a count of steps gives."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.warmup_steps * global_batch_size,
        lr_decay_steps=(config.decay_steps or max_steps) * global_batch_size,
        lr_decay_style=config.decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=0,
        wd_incr_style="constant",
    )
