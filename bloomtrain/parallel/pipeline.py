"""Pipeline parallelism: BLOOM as a DeepSpeed ``PipelineModule`` built from the layer table of ``names.py``.

    [word embedding (tied)] [embedding LayerNorm] [block 0] ... [block L-1] [final LayerNorm] [LM head (tied)]

The word embedding is a ``TiedLayerSpec`` on the first and the last stage (DeepSpeed all-reduces its
gradient between the two); blocks are balanced over stages by ``partition_method="type:BlockStage"``.
Each stage builds only its own layers: a spec constructs the plain BLOOM sub-module, initialises it
under its name in the full model (so its weights equal the single-process model's), then applies
tensor parallelism when the tensor group has more than one rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state
from torch import nn

from bloomtrain.config import ModelConfig
from bloomtrain.model.bloom import BloomBlock, attention_allowed, init_bloom_weights
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.names import PipelineLayer, pipeline_layers
from bloomtrain.parallel.tensor_parallel import (
    final_layernorm_into_tensor_parallel,
    mark_replicated_module,
    megatron_layer_config,
    parallelize_block,
    vocab_parallel_embedding,
    vocab_parallel_loss,
)


def _tensor_parallel() -> bool:
    return parallel_state.get_tensor_model_parallel_world_size() > 1


class WordEmbeddingStage(nn.Module):
    def __init__(self, config: ModelConfig, padded_vocab_size: int, seed: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab_size, config.hidden_size)
        init_bloom_weights(self, config, seed)
        if _tensor_parallel():
            self.word_embeddings = vocab_parallel_embedding(self.word_embeddings,
                                                            megatron_layer_config(sequence_parallel))

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        tokens, segments = _split(inputs)
        return _join(self.word_embeddings(tokens.t()), segments)  # activations are [seq, batch, hidden]


def lm_head(stage: WordEmbeddingStage, inputs) -> torch.Tensor:
    """The tied LM head on the last stage: (vocab-parallel) logits [batch, seq, vocab] from the shared embedding."""
    hidden, _ = _split(inputs)
    return F.linear(hidden, stage.word_embeddings.weight).transpose(0, 1)


def _split(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed fine-tuning rows travel as (activation, segment ids) so every stage can mask attention;
    pretraining rows as the activation alone."""
    return (inputs[0], inputs[1]) if isinstance(inputs, tuple) else (inputs, None)


def _join(hidden: torch.Tensor, segments: torch.Tensor | None):
    return hidden if segments is None else (hidden, segments)


class LayerNormStage(nn.Module):
    """The embedding LayerNorm, or (``into_tensor_parallel``) the final one feeding the LM head."""

    def __init__(self, config: ModelConfig, name: str, seed: int, into_tensor_parallel: bool,
                 sequence_parallel: bool) -> None:
        super().__init__()
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        init_bloom_weights(norm, config, seed, prefix=name)
        if into_tensor_parallel and _tensor_parallel():
            norm = final_layernorm_into_tensor_parallel(norm, megatron_layer_config(sequence_parallel))
        mark_replicated_module(norm, sequence_parallel)
        self.norm = norm

    def forward(self, inputs):
        hidden, segments = _split(inputs)
        return _join(self.norm(hidden), segments)


class BlockStage(nn.Module):
    def __init__(self, config: ModelConfig, index: int, seed: int, sequence_parallel: bool) -> None:
        super().__init__()
        block = BloomBlock(config)
        init_bloom_weights(block, config, seed, prefix=f"h.{index}")
        if _tensor_parallel():
            parallelize_block(block, megatron_layer_config(sequence_parallel))
        self.block = block

    def forward(self, inputs):
        hidden, segments = _split(inputs)
        if segments is None:
            return self.block(hidden)
        return self.block(hidden, allowed=attention_allowed(segments=segments)), segments


def _layer_spec(layer: PipelineLayer, config: ModelConfig, padded_vocab_size: int, seed: int,
                sequence_parallel: bool) -> LayerSpec:
    if layer.kind in ("embedding", "head"):
        return TiedLayerSpec(layer.tie_key, WordEmbeddingStage, config, padded_vocab_size, seed, sequence_parallel,
                             forward_fn=lm_head if layer.kind == "head" else None,
                             tied_weight_attr=f"{layer.attribute}.weight")
    if layer.kind in ("embedding_norm", "final_norm"):
        return LayerSpec(LayerNormStage, config, layer.plain_prefix, seed, layer.kind == "final_norm",
                         sequence_parallel)
    assert layer.kind == "block", layer
    return LayerSpec(BlockStage, config, layer.block_index, seed, sequence_parallel)


def build_pipeline_module(config: ModelConfig, layout: ParallelLayout, padded_vocab_size: int, seed: int,
                          activation_checkpointing: bool) -> PipelineModule:
    specs = [_layer_spec(layer, config, padded_vocab_size, seed, layout.sequence_parallel)
             for layer in pipeline_layers(config.num_layers)]
    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    return PipelineModule(
        layers=specs,
        loss_fn=vocab_parallel_loss,
        topology=topology,
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=recompute,
    )


def recompute(function, *inputs: torch.Tensor):
    """Activation checkpointing: keep only the layer's inputs, recompute the rest in backward.

    PyTorch's non-reentrant checkpoint works on any device; BLOOM has no dropout, so no RNG state needs
    restoring for the recomputation to be exact.
    """
    return torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)
