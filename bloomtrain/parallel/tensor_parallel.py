"""Tensor parallelism for the plain BLOOM modules, with megatron-core's ``tensor_parallel`` layers.

Applied to already-initialised modules: each parallel layer receives its slice of the full weights,
so a tensor-parallel model holds exactly the weights of the single-process one.

- fused QKV and h->4h: column-parallel (a contiguous block of whole heads per rank, since BLOOM's
  fused layout is [heads, 3, head_dim]); attention output and 4h->h: row-parallel;
- word embedding: vocab-parallel; the tied LM head multiplies by the local vocab shard, after the
  final LayerNorm's output enters the tensor-parallel region (identity forward, all-reduce backward);
  the loss is megatron-core's ``vocab_parallel_cross_entropy``;
- ALiBi slopes: each rank keeps its heads' slice;
- replicated parameters (LayerNorms, row-parallel biases): their gradients are averaged over the
  tensor group, so they stay bitwise equal across ranks. BLOOM's original code let them drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from bloomtrain.model.bloom import BloomBlock


def megatron_layer_config() -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # weights are copied in from the initialised plain module
        params_dtype=torch.float32,
    )


def _no_init(_: torch.Tensor) -> None:
    pass


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear, returning just the output like ``nn.Linear``."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)[0]


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)[0]


class LayerNormIntoTensorParallel(nn.LayerNorm):
    """The final LayerNorm, whose output enters the tensor-parallel region of the vocab-parallel head."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.copy_to_tensor_model_parallel_region(super().forward(hidden))


def _shard(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    return tensor.chunk(size, dim=dim)[rank]


def column_parallel(linear: nn.Linear, config: ModelParallelConfig) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(linear.in_features, linear.out_features, config=config, init_method=_no_init,
                                 bias=True, gather_output=False)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 0))
        layer.bias.copy_(_shard(linear.bias, 0))
    _mark_sharded(layer.weight, dim=0)
    return layer.to(linear.weight.device)


def row_parallel(linear: nn.Linear, config: ModelParallelConfig) -> RowParallelLinear:
    layer = RowParallelLinear(linear.in_features, linear.out_features, config=config, init_method=_no_init,
                              bias=True, input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 1))
        layer.bias.copy_(linear.bias)
    _mark_sharded(layer.weight, dim=1)
    mark_replicated(layer.bias)
    return layer.to(linear.weight.device)


def vocab_parallel_embedding(embedding: nn.Embedding, config: ModelParallelConfig) -> nn.Module:
    layer = tensor_parallel.VocabParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim,
                                                   init_method=_no_init, config=config)
    with torch.no_grad():
        layer.weight.copy_(_shard(embedding.weight, 0))
    _mark_sharded(layer.weight, dim=0)
    return layer.to(embedding.weight.device)


def _mark_sharded(weight: torch.Tensor, dim: int) -> None:
    # megatron-core tags its sharded weights only inside its own init routines, which we skip; DeepSpeed's
    # and our gradient norms read this tag to count each shard once.
    tensor_parallel.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def final_layernorm_into_tensor_parallel(norm: nn.LayerNorm) -> LayerNormIntoTensorParallel:
    layer = LayerNormIntoTensorParallel(norm.normalized_shape, eps=norm.eps)
    layer.load_state_dict(norm.state_dict())
    mark_replicated_module(layer)
    return layer.to(norm.weight.device)


def parallelize_block(block: BloomBlock, config: ModelParallelConfig) -> BloomBlock:
    attention, mlp = block.self_attention, block.mlp
    attention.query_key_value = column_parallel(attention.query_key_value, config)
    attention.dense = row_parallel(attention.dense, config)
    attention.alibi_slopes = _shard(attention.alibi_slopes, 0).clone()
    mlp.dense_h_to_4h = column_parallel(mlp.dense_h_to_4h, config)
    mlp.dense_4h_to_h = row_parallel(mlp.dense_4h_to_h, config)
    mark_replicated_module(block.input_layernorm)
    mark_replicated_module(block.post_attention_layernorm)
    return block


def apply_tensor_parallel(model: nn.Module) -> nn.Module:
    """Make a whole (single-stage) ``Bloom`` tensor-parallel in place; returns it."""
    config = megatron_layer_config()
    for block in model.h:
        parallelize_block(block, config)
    model.word_embeddings = vocab_parallel_embedding(model.word_embeddings, config)
    mark_replicated_module(model.word_embeddings_layernorm)
    model.ln_f = final_layernorm_into_tensor_parallel(model.ln_f)
    return model


def mark_replicated_module(module: nn.Module) -> None:
    for param in module.parameters():
        mark_replicated(param)


def mark_replicated(param: torch.Tensor) -> None:
    """Average this replicated parameter's gradient over the tensor group on every backward."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1 or getattr(param, "_bloomtrain_synced", False):
        return
    param._bloomtrain_synced = True
    param.register_hook(_average_over_tensor_group)


def _average_over_tensor_group(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad / parallel_state.get_tensor_model_parallel_world_size()


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over vocab-parallel logits (any tensor-parallel size, 1 included)."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()
