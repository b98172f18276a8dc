"""A thin wrapper over DeepSpeed's engine: its config for a layout, and one optimizer step.

- pipeline = 1: the (tensor-parallel) plain model in DeepSpeed's engine (ZeRO stages 0-3);
- pipeline > 1: the ``PipelineModule`` in DeepSpeed's pipeline engine (1F1B schedule, ZeRO 0-1),
  micro-batches = global batch / (micro batch x data parallel).
Precision (fp32, bf16, fp16 with dynamic loss scaling), ZeRO and gradient clipping are DeepSpeed's.
The module comes from ``parallelize.py`` and the optimizer from ``bloomtrain.optim``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from bloomtrain.config import ConfigError, TrainConfig
from bloomtrain.parallel.clipping import deepspeed_clips, parameter_norm
from bloomtrain.parallel.groups import MegatronModelParallelUnit
from bloomtrain.parallel.layout import DEEPSPEED_REDUCE_BUCKET, ParallelLayout, gradient_bucket_elements
from bloomtrain.parallel.tensor_parallel import vocab_parallel_loss


def deepspeed_config(train: TrainConfig, grad_clip: float, layout: ParallelLayout,
                     load_universal: bool = False, parameters: int = DEEPSPEED_REDUCE_BUCKET) -> dict:
    micro_batches = train.global_batch_size // (train.micro_batch_size * layout.data)
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": grad_clip if deepspeed_clips(train.precision, layout.zero_stage) else 0.0,
        "zero_optimization": {"stage": layout.zero_stage,
                              "reduce_bucket_size": gradient_bucket_elements(parameters)},
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


def check_precision_supported(precision: str) -> None:
    """Refuse, in one line, a precision this machine's DeepSpeed accelerator does not run."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        others = ", ".join(name for name, ok in supported.items() if ok and name != precision)
        raise ConfigError(f"train.precision={precision} is not supported by DeepSpeed's "
                          f"{accelerator.device_name()} accelerator here; use train.precision={others}")


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None  # NaN/Inf on a step DeepSpeed (or our optimizer) skipped; None when unknown
    optimizer_s: float | None = None  # the optimizer step alone (not separable under pipeline parallelism)


class TrainingEngine:
    """Owns the DeepSpeed engine; ``train_step`` runs one optimizer step over this rank's micro-batches."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, grad_clip: float,
                 layout: ParallelLayout, load_universal: bool = False) -> None:
        self.layout = layout
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(train, grad_clip, layout, load_universal,
                                    parameters=sum(p.numel() for p in module.parameters())),
            mpu=None if layout.pipeline > 1 else MegatronModelParallelUnit(),
        )
        self.module = self.engine.module

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's loss: the mean over its tokens, or (packed fine-tuning rows) the sum of its
        weighted target losses, its examples kept apart by their segment ids."""
        device = self.engine.device
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        if "segments" in batch:
            logits = self.engine(tokens, segments=batch["segments"].to(device, non_blocking=True))
        else:
            logits = self.engine(tokens)
        if "loss_weights" in batch:
            return vocab_parallel_loss(logits, (labels, batch["loss_weights"].to(device, non_blocking=True)))
        return vocab_parallel_loss(logits, labels)

    @staticmethod
    def _pipeline_batches(micro_batches: list[dict[str, torch.Tensor]]):
        """(inputs, labels) per micro-batch, as the pipeline's first and last stages take them."""
        def pair(batch):
            inputs = (batch["tokens"], batch["segments"]) if "segments" in batch else batch["tokens"]
            labels = (batch["labels"], batch["loss_weights"]) if "loss_weights" in batch else batch["labels"]
            return inputs, labels
        return iter([pair(batch) for batch in micro_batches])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        self.engine.train()
        if self.layout.pipeline > 1:
            loss = self.engine.train_batch(data_iter=self._pipeline_batches(micro_batches)).item()
        else:
            total = torch.zeros((), device=self.engine.device)
            for index, batch in enumerate(micro_batches):
                # The step's last micro-batch is the boundary, said explicitly: DeepSpeed's own micro-step
                # count drifts from the step boundaries once a batch ramp-up changes their number.
                self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
                loss = self._loss(batch)
                self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                started = time.perf_counter()
                self.engine.step()  # an optimizer step only at the accumulation boundary (the last)
                optimizer_s = time.perf_counter() - started
                total += loss.detach().float()
            total /= len(micro_batches)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            loss = total.item() / self.layout.data
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            if grad_norm < 0:  # DeepSpeed's sentinel for a NaN/Inf norm
                grad_norm = math.nan
        return StepResult(loss, grad_norm, optimizer_s if self.layout.pipeline == 1 else None)

    def loss_scale(self) -> float | None:
        """fp16's current dynamic loss scale; None in fp32 and bf16."""
        if not self.engine.fp16_enabled():
            return None
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None

    def skipped_steps(self) -> int | None:
        """Optimizer steps DeepSpeed skipped on an fp16 overflow; None in fp32 and bf16."""
        return int(self.engine.skipped_steps) if self.engine.fp16_enabled() else None

    def parameter_norm(self) -> float | None:
        """Collective over the model-parallel group: the L2 norm of all parameters, each counted once
        (None under ZeRO 3, whose parameters are partitioned away)."""
        if self.layout.zero_stage == 3:
            return None
        return parameter_norm(self.module.parameters())

    @torch.no_grad()
    def evaluate_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """Forward only: the mean loss of one step's micro-batches, averaged over data-parallel ranks."""
        self.engine.eval()
        if self.layout.pipeline > 1:
            return self.engine.eval_batch(data_iter=self._pipeline_batches(micro_batches),
                                          num_micro_batches=len(micro_batches)).item()
        total = torch.zeros((), device=self.engine.device)
        for batch in micro_batches:
            total += self._loss(batch).float()
        total /= len(micro_batches)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.item() / self.layout.data

    def local_parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
