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

Sequence parallelism (optional, megatron-core's): outside the column/row-parallel pairs — LayerNorms,
residual adds — each tensor rank keeps only its slice of the sequence, [seq / T, batch, hidden].
Column-parallel layers all-gather the sequence on entry, row-parallel layers reduce-scatter it on
exit, the embedding reduce-scatters its output and the final LayerNorm's output is all-gathered into
the vocab-parallel head. Replicated parameters then see only their rank's tokens, so their gradients
are summed over the tensor group instead of averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from bloomtrain.model.bloom import BloomBlock
from bloomtrain.parallel.cpu import initialize_on_cpu


def megatron_layer_config(sequence_parallel: bool = False) -> ModelParallelConfig:
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor,
        sequence_parallel=sequence_parallel and tensor > 1,
        use_cpu_initialization=initialize_on_cpu(),
        perform_initialization=False,  # weights are copied in from the initialised plain module
        params_dtype=torch.float32,
    )


def _no_init(_: torch.Tensor) -> None:
    pass


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear, returning just the output like ``nn.Linear``.

    Saves no (always empty) ``_extra_state``, so state dicts hold exactly ``nn.Linear``'s keys; loading
    still accepts the empty one megatron's pre-hook adds.
    """

    get_extra_state = nn.Module.get_extra_state

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)[0]


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    get_extra_state = nn.Module.get_extra_state

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden)[0]


class LayerNormIntoTensorParallel(nn.LayerNorm):
    """The final LayerNorm, whose output enters the tensor-parallel region of the vocab-parallel head."""

    sequence_parallel: bool = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = super().forward(hidden)
        if self.sequence_parallel:
            # Each rank's vocab shard contributes to every position's gradient: reduce-scatter backward.
            return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


class SequenceParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocab-parallel embedding whose output is reduce-scattered along the sequence.

    megatron-core's version takes batch-first token ids; ours come sequence-first like the activations.
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens.t())


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
    mark_replicated(layer.bias, config.sequence_parallel)
    return layer.to(linear.weight.device)


def vocab_parallel_embedding(embedding: nn.Embedding, config: ModelParallelConfig) -> nn.Module:
    if config.sequence_parallel:
        layer = SequenceParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim, init_method=_no_init,
                                          config=config, reduce_scatter_embeddings=True)
    else:
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


def final_layernorm_into_tensor_parallel(norm: nn.LayerNorm,
                                         config: ModelParallelConfig) -> LayerNormIntoTensorParallel:
    layer = LayerNormIntoTensorParallel(norm.normalized_shape, eps=norm.eps)
    layer.load_state_dict(norm.state_dict())
    layer.sequence_parallel = config.sequence_parallel
    mark_replicated_module(layer, config.sequence_parallel)
    return layer.to(norm.weight.device)


def parallelize_block(block: BloomBlock, config: ModelParallelConfig) -> BloomBlock:
    attention, mlp = block.self_attention, block.mlp
    attention.query_key_value = column_parallel(attention.query_key_value, config)
    attention.dense = row_parallel(attention.dense, config)
    attention.alibi_slopes = _shard(attention.alibi_slopes, 0).clone()
    local_heads = attention.alibi_slopes.numel()
    attention.heads_key = (attention.num_heads, parallel_state.get_tensor_model_parallel_rank() * local_heads,
                           local_heads)
    mlp.dense_h_to_4h = column_parallel(mlp.dense_h_to_4h, config)
    mlp.dense_4h_to_h = row_parallel(mlp.dense_4h_to_h, config)
    mark_replicated_module(block.input_layernorm, config.sequence_parallel)
    mark_replicated_module(block.post_attention_layernorm, config.sequence_parallel)
    return block


def apply_tensor_parallel(model: nn.Module, sequence_parallel: bool = False) -> nn.Module:
    """Make a whole (single-stage) ``Bloom`` tensor-parallel in place; returns it."""
    config = megatron_layer_config(sequence_parallel)
    for block in model.h:
        parallelize_block(block, config)
    model.word_embeddings = vocab_parallel_embedding(model.word_embeddings, config)
    mark_replicated_module(model.word_embeddings_layernorm, config.sequence_parallel)
    model.ln_f = final_layernorm_into_tensor_parallel(model.ln_f, config)
    return model


def mark_replicated_module(module: nn.Module, sequence_parallel: bool = False) -> None:
    for param in module.parameters():
        mark_replicated(param, sequence_parallel)


def mark_replicated(param: torch.Tensor, sequence_parallel: bool = False) -> None:
    """Sync this replicated parameter's gradient over the tensor group on every backward.

    Without sequence parallelism every tensor rank computed the same gradient (averaging only removes
    rounding differences); with it each rank computed its sequence slice's share (summing completes it).
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1 or getattr(param, "_bloomtrain_synced", False):
        return
    param._bloomtrain_synced = True
    param.register_hook(_sum_over_tensor_group if sequence_parallel else _average_over_tensor_group)


def _sum_over_tensor_group(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def _average_over_tensor_group(grad: torch.Tensor) -> torch.Tensor:
    return _sum_over_tensor_group(grad) / parallel_state.get_tensor_model_parallel_world_size()


def vocab_parallel_loss(logits: torch.Tensor,
                        labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy over vocab-parallel logits (any tensor-parallel size, 1 included);
    with ``labels`` a pair ``(labels, weights)`` (packed fine-tuning rows), the weighted sum instead.

    ``logits`` are [batch, seq, vocab shard], normally the transposed view of the model's sequence-first
    product: transposing back gives the contiguous tensor megatron-core's loss needs without a copy.
    The pipeline's last stage calls this too, so the weights travel as part of its labels.
    """
    weights = None
    if isinstance(labels, (tuple, list)):
        labels, weights = labels
    logits = logits.transpose(0, 1).contiguous()
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
    return losses.mean() if weights is None else (losses * weights.t().float()).sum()
