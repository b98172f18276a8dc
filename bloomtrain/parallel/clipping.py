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
    """AdamW that clips by the global gradient norm first, and skips a step whose norm is NaN/Inf as
    DeepSpeed's own wrappers do.

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
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = _global_norm([p.grad for p in params if _counts_once(p)], params[0].device)
        self._global_grad_norm = norm.item()
        if not torch.isfinite(norm):
            return None  # a NaN/Inf gradient: skip the step, weights and moments untouched (bloomtrain/health.py)
        if self.max_norm > 0:
            scale = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return super().step(closure)


@torch.no_grad()
def parameter_norm(params: Iterable[torch.Tensor]) -> float:
    """Collective over the model-parallel group: the global L2 norm of a model's parameters."""
    params = list(params)
    return _global_norm([p.detach() for p in params if _counts_once(p)], params[0].device).item()


def _global_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for tensor in tensors:
        squares += tensor.float().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return squares.sqrt()


def _counts_once(param: torch.Tensor) -> bool:
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0
