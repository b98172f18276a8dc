"""Build the model one rank trains under a (tensor, pipeline, data) layout, in a fixed order:

1. the module: the plain ``Bloom`` (pipeline 1), or this rank's stages of the ``PipelineModule``
   (``pipeline.py``), built on the meta device and initialised as the single-process model would be;
2. tensor parallelism (megatron-core layers holding this rank's slice of the initialised weights);
3. activation checkpointing (recompute each block in backward);
4. weights from a checkpoint, when a run starts from one without its optimizer state
   (``convert from-hf``): copied last, so every earlier step sees the same module it would otherwise.

The optimizer and the DeepSpeed engine are built afterwards from the returned module
(``bloomtrain.optim``, ``engine.py``).
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state
from torch import nn

from bloomtrain.config import ModelConfig
from bloomtrain.model import build_model
from bloomtrain.model.bloom import BloomBlock
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.names import plain_name, shard_dim
from bloomtrain.parallel.pipeline import build_pipeline_module, recompute
from bloomtrain.parallel.tensor_parallel import apply_tensor_parallel


def build_parallel_model(config: ModelConfig, layout: ParallelLayout, device: torch.device, seed: int,
                         padded_vocab_size: int, activation_checkpointing: bool = False,
                         initial_weights: dict[str, torch.Tensor] | None = None, compile_blocks: bool = False
                         ) -> nn.Module:
    """This rank's part of the model; ``initial_weights`` (full, plain-named) replace the initialisation."""
    if layout.pipeline > 1:
        # The pipeline module applies tensor parallelism and recomputation per stage as it builds them.
        module: nn.Module = build_pipeline_module(config, layout, padded_vocab_size, seed, activation_checkpointing)
        module.to(device)
    else:
        module = build_model(config, device, seed=seed, padded_vocab_size=padded_vocab_size)
        module = apply_tensor_parallel(module, layout.sequence_parallel)
        if activation_checkpointing:
            apply_activation_checkpointing(module)
    if initial_weights is not None:
        load_plain_weights(module, initial_weights, config.num_layers)
    if compile_blocks:
        apply_compile(module)
    return module


def apply_compile(module: nn.Module) -> None:
    """torch.compile every block, wherever the layout put it (pipeline stages wrap them): its elementwise
    work fused; the first step pays for the compilation (``train.compile``)."""
    for block in [child for child in module.modules() if isinstance(child, BloomBlock)]:
        block.compile()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block of a plain (possibly tensor-parallel) ``Bloom`` in backward."""
    for block in model.h:
        block.forward = functools.partial(recompute, block.forward)


@torch.no_grad()
def load_plain_weights(module: nn.Module, weights: dict[str, torch.Tensor], num_layers: int) -> None:
    """Copy full plain-named weights into this rank's (tensor-sharded, pipeline-staged) module."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    is_pipeline = hasattr(module, "forward_funcs")
    for name, param in module.named_parameters():
        plain = plain_name(name, num_layers) if is_pipeline else name
        full = weights[plain]
        dim = shard_dim(plain)
        local = full if dim is None or size == 1 else full.chunk(size, dim=dim)[rank]
        if local.shape != param.shape:
            raise ValueError(f"{plain}: the checkpoint's shard has shape {tuple(local.shape)}, the model's "
                             f"{tuple(param.shape)}")
        param.copy_(local)
