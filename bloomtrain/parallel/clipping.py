"""Gradient clipping by the global norm of a tensor x pipeline parallel model.

DeepSpeed clips gradients itself wherever it owns the optimizer step's gradients (ZeRO >= 1, bf16,
fp16). With fp32 and ZeRO 0 it hands our optimizer the gradients directly, and its own clipping there
counts a pipeline stage's replicated parameters on one stage only, so bloomtrain's optimizer clips.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def deepspeed_clips(precision: str, zero_stage: int) -> bool:
    """Whether DeepSpeed clips the gradients (else :class:`AdamWWithGlobalClipping` does)."""
    return precision != "fp32" or zero_stage > 0


class AdamWWithGlobalClipping(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm first.

    The norm counts each parameter once: tensor-sharded ones on every rank, tensor-replicated ones on
    tensor rank 0, and the tied embedding (``ds_pipe_replicated`` on the last stage) on the first
    stage only.
    """

    def __init__(self, params: Iterable, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self._global_grad_norm: float | None = None  # read by DeepSpeed's get_global_grad_norm()

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
