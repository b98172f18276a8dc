"""The DeepSpeed engine that trains BLOOM under any (tensor, pipeline, data) layout.

- pipeline = 1: the plain model, made tensor-parallel, in DeepSpeed's engine (ZeRO stages 0-3);
- pipeline > 1: the ``PipelineModule`` of ``pipeline.py`` in DeepSpeed's pipeline engine (1F1B
  schedule, ZeRO 0-1), micro-batches = global batch / (micro batch x data parallel).
Precision (fp32, bf16, fp16 with dynamic loss scaling), ZeRO and gradient clipping are DeepSpeed's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from megatron.core import parallel_state
from torch import nn

from bloomtrain.checkpoint.weights import copy_plain_weights
from bloomtrain.config import ModelConfig, OptimizerConfig, TrainConfig
from bloomtrain.model import build_model
from bloomtrain.optim import parameter_groups
from bloomtrain.parallel.groups import MegatronModelParallelUnit
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.pipeline import build_pipeline_module, recompute
from bloomtrain.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_loss


def deepspeed_config(train: TrainConfig, optimizer: OptimizerConfig, layout: ParallelLayout,
                     deepspeed_clips: bool, load_universal: bool = False) -> dict:
    micro_batches = train.global_batch_size // (train.micro_batch_size * layout.data)
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": optimizer.grad_clip if deepspeed_clips else 0.0,
        "zero_optimization": {"stage": layout.zero_stage},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if load_universal:
        # Restore from a universal checkpoint: each rank slices its part out of full parameters.
        config["checkpoint"] = {"load_universal": True}
    if layout.sequence_parallel:
        # DeepSpeed's pipeline sends 1/T of an activation from each tensor rank and gathers the pieces
        # on the next stage, assuming the tensor ranks hold the same activation. Under sequence
        # parallelism each holds a different slice, so every rank sends its own slice whole.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        # Dynamic loss scaling: start at 2**16, halve on overflow, double after 1000 clean steps.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config


class AdamWWithGlobalClipping(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm of a tensor x pipeline parallel model first.

    Used where DeepSpeed hands our optimizer the gradients directly (fp32 without ZeRO): its clipping
    there counts a pipeline stage's replicated parameters on one stage only. The norm counts each
    parameter once: tensor-sharded ones on every rank, tensor-replicated ones on tensor rank 0, and
    the tied embedding (``ds_pipe_replicated`` on the last stage) on the first stage only.
    """

    def __init__(self, params: Iterable, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None and _counts_once(p)]
        squares = torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        for grad in grads:
            squares += grad.float().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        norm = squares.sqrt()
        self._global_grad_norm = norm.item()
        if self.max_norm > 0:
            scale = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return super().step(closure)


def _counts_once(param: torch.Tensor) -> bool:
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None


class TrainingEngine:
    """Owns the DeepSpeed engine; ``train_step`` runs one optimizer step over this rank's micro-batches."""

    def __init__(self, model_config: ModelConfig, train: TrainConfig, optimizer_config: OptimizerConfig,
                 layout: ParallelLayout, device: torch.device, activation_checkpointing: bool = False,
                 padded_vocab_size: int | None = None, load_universal: bool = False,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> None:
        """``padded_vocab_size`` keeps a checkpoint's padding; ``initial_weights`` (full, plain-named)
        replace the initialisation, before DeepSpeed builds its optimizer state from the parameters."""
        self.layout = layout
        self.padded_vocab_size = padded_vocab_size or model_config.padded_vocab_size(layout.tensor)
        if layout.pipeline > 1:
            module: nn.Module = build_pipeline_module(model_config, layout, self.padded_vocab_size, train.seed,
                                                      activation_checkpointing)
            module.to(device)
        else:
            module = build_model(model_config, device, seed=train.seed, padded_vocab_size=self.padded_vocab_size)
            module = apply_tensor_parallel(module, layout.sequence_parallel)
            if activation_checkpointing:
                for block in module.h:
                    block.forward = functools.partial(recompute, block.forward)
        if initial_weights is not None:
            copy_plain_weights(module, initial_weights, model_config.num_layers)
        deepspeed_clips = train.precision != "fp32" or layout.zero_stage > 0
        adam = dict(lr=optimizer_config.lr, betas=(optimizer_config.beta1, optimizer_config.beta2),
                    eps=optimizer_config.eps, weight_decay=optimizer_config.weight_decay)
        if deepspeed_clips:
            optimizer = torch.optim.AdamW(parameter_groups(module), **adam)
        else:
            optimizer = AdamWWithGlobalClipping(parameter_groups(module), optimizer_config.grad_clip, **adam)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(train, optimizer_config, layout, deepspeed_clips, load_universal),
            mpu=None if layout.pipeline > 1 else MegatronModelParallelUnit(),
        )
        self.module = self.engine.module

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        self.engine.train()
        if self.layout.pipeline > 1:
            batches = iter([(batch["tokens"], batch["labels"]) for batch in micro_batches])
            loss = self.engine.train_batch(data_iter=batches).item()
        else:
            total = torch.zeros((), device=self.engine.device)
            for batch in micro_batches:
                tokens = batch["tokens"].to(self.engine.device, non_blocking=True)
                labels = batch["labels"].to(self.engine.device, non_blocking=True)
                loss = vocab_parallel_loss(self.engine(tokens), labels)
                self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                self.engine.step()  # an optimizer step only at the accumulation boundary
                total += loss.detach().float()
            total /= len(micro_batches)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            loss = total.item() / self.layout.data
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm) or grad_norm < 0:  # an fp16 overflow step, skipped by DeepSpeed
                grad_norm = None
        return StepResult(loss, grad_norm)

    def local_parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
