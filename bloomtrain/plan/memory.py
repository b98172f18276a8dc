"""Memory per GPU: the parameters each rank holds, their state by precision and ZeRO stage, and the
activations of the micro-batches in flight (docs/planning.md has every formula)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

from bloomtrain.config import ModelConfig
from bloomtrain.parallel.layout import DEEPSPEED_REDUCE_BUCKET, ParallelLayout, gradient_bucket_elements
from bloomtrain.parallel.names import pipeline_layers, shard_dim

GIB = 2**30


@dataclass(frozen=True)
class PlannedLayout(ParallelLayout):
    """A run's layout with what the planner also varies per rank: the micro-batch and recomputation."""

    micro_batch_size: int = 1
    activation_checkpointing: bool = False

    def describe(self) -> str:
        return (f"TP{self.tensor} PP{self.pipeline} DP{self.data} mb{self.micro_batch_size} ZeRO{self.zero_stage}"
                f"{' AC' if self.activation_checkpointing else ''}{' SP' if self.sequence_parallel else ''}")


@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU (the first pipeline stage)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int  # micro-batches whose activations the first stage holds at once (1F1B)
    gradient_bucket: float = 0.0  # ZeRO 1/2's staging bucket, where it does not hold the gradients themselves

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.gradient_bucket

def stage_parameters(model: ModelConfig, tensor: int, pipeline: int) -> tuple[int, ...]:
    """Parameters one tensor rank of each pipeline stage holds: the model's own shapes (meta device),
    split over the tensor group as megatron-core splits them, blocks balanced over stages as DeepSpeed's
    ``partition_method="type:BlockStage"`` does, the tied embedding on the first and the last stage."""
    return _stage_parameters(tuple(dataclasses.asdict(model).items()), tensor, pipeline)


@cache  # the suggester asks for many (tensor, pipeline) pairs of one model
def _stage_parameters(model_fields: tuple, tensor: int, pipeline: int) -> tuple[int, ...]:
    model = ModelConfig(**dict(model_fields))
    sizes = {name: (model.padded_vocab_size(tensor) * model.hidden_size if name == "word_embeddings.weight"
                    else count) for name, count in _parameter_shapes(model_fields)}
    sizes = {name: count if shard_dim(name) is None else count // tensor for name, count in sizes.items()}
    layers = pipeline_layers(model.num_layers)
    bounds = _stage_bounds(model.num_layers, pipeline)
    held = []
    for stage in range(pipeline):
        prefixes = tuple(layer.plain_prefix + "." for layer in layers[bounds[stage]:bounds[stage + 1]])
        held.append(sum(count for name, count in sizes.items() if name.startswith(prefixes)))
    return tuple(held)


@cache
def _parameter_shapes(model_fields: tuple) -> tuple[tuple[str, int], ...]:
    """(name, elements) of every parameter of the plain model, built on the meta device (no memory)."""
    import torch

    from bloomtrain.model.bloom import Bloom

    with torch.device("meta"):
        plain = Bloom(ModelConfig(**dict(model_fields)))
    return tuple((name, param.numel()) for name, param in plain.named_parameters())


@cache
def _stage_bounds(num_layers: int, pipeline: int) -> list[int]:
    from deepspeed.runtime.utils import partition_balanced

    return partition_balanced([int(layer.kind == "block") for layer in pipeline_layers(num_layers)], pipeline)


def blocks_per_stage(num_layers: int, pipeline: int) -> list[int]:
    layers, bounds = pipeline_layers(num_layers), _stage_bounds(num_layers, pipeline)
    return [sum(layer.kind == "block" for layer in layers[bounds[s]:bounds[s + 1]]) for s in range(pipeline)]

def state_bytes_per_parameter(precision: str, zero_stage: int, data: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per held parameter.

    fp32 under ZeRO 0: the weights are the optimizer's own and Adam keeps two fp32 moments (8 bytes).
    Under ZeRO >= 1, and in half precision always, the optimizer also keeps an fp32 copy of the weights
    (12 bytes with the moments), split over data-parallel ranks from ZeRO 1 on, and during the step an
    fp32 gradient of that copy (4 bytes, counted with the gradients); ZeRO 2 also splits the model's
    gradients, ZeRO 3 its weights. Measured against DeepSpeed's own tensors in tests/test_plan.py."""
    weight = 4.0 if precision == "fp32" else 2.0
    has_master = precision != "fp32" or zero_stage >= 1
    shards = data if zero_stage >= 1 else 1
    optimizer = (12.0 if has_master else 8.0) / shards
    gradient = (weight / data if zero_stage >= 2 else weight) + (4.0 / shards if has_master else 0.0)
    if zero_stage >= 3:
        weight /= data
    return weight, gradient, optimizer


# bloomtrain's block, per s b h in bf16, from the tensors its autograd saves (tests/test_plan.py): the LayerNorm
# inputs and the inputs of the two matmuls that see the whole hidden state stay whole under tensor
# parallelism (8); the rest splits over t, the GeLU's input and the attention's output and statistics
# included (34). Nothing grows with s: the fused attention kernels keep no probabilities, and the ALiBi
# bias is one tensor shared by every block (counted once per stage). fp32 saves 1.5x as much (softmax
# statistics do not grow with the precision).
UNSPLIT_PER_SBH, SPLIT_PER_SBH, FP32_SCALE = 8.0, 34.0, 1.5


def activation_bytes_per_layer(model: ModelConfig, seq_length: int, micro_batch_size: int, tensor: int,
                               precision: str, recompute: bool, sequence_parallel: bool) -> float:
    """One block's activations kept for backward, for one micro-batch, in the form of Korthikanti et al.
    (2022), "Reducing Activation Recomputation in Large Transformer Models", with bloomtrain's measured
    constants: s b h (8 + 34/t) bytes in half precision (the paper's 10 + 24/t + 5 a s/(h t) counts
    dropout, which BLOOM trains without, attention probabilities, which fused kernels do not keep, and a
    GeLU that saves less than tanh-GeLU's autograd),
    all of it / t with sequence parallelism; fp32 1.5 times that. With activation checkpointing a block
    keeps only its input, 2 s b h (/ t with sequence parallelism; 4 in fp32)."""
    s, b, h, t = seq_length, micro_batch_size, model.hidden_size, tensor
    if recompute:
        return (2.0 if precision == "fp32" else 1.0) * 2 * s * b * h / (t if sequence_parallel else 1)
    scale = FP32_SCALE if precision == "fp32" else 1.0
    if sequence_parallel:
        return scale * s * b * h * (UNSPLIT_PER_SBH + SPLIT_PER_SBH) / t
    return scale * s * b * h * (UNSPLIT_PER_SBH + SPLIT_PER_SBH / t)


def estimate_memory(model: ModelConfig, layout: PlannedLayout, precision: str, seq_length: int,
                    global_batch_size: int) -> Memory:
    """Bytes on the first pipeline stage's GPUs."""
    params = stage_parameters(model, layout.tensor, layout.pipeline)[0]
    weight, gradient, optimizer = state_bytes_per_parameter(precision, layout.zero_stage, layout.data)
    micro_batches = global_batch_size // (layout.micro_batch_size * layout.data)
    in_flight = min(layout.pipeline, micro_batches)
    blocks = blocks_per_stage(model.num_layers, layout.pipeline)[0]
    per_layer = activation_bytes_per_layer(model, seq_length, layout.micro_batch_size, layout.tensor, precision,
                                           layout.activation_checkpointing, layout.sequence_parallel)
    scale = 2.0 if precision == "fp32" else 1.0
    s, b, h = seq_length, layout.micro_batch_size, model.hidden_size
    # The embedding's output and its LayerNorm's (kept for backward), per micro-batch in flight.
    embedding = scale * 2 * 2 * s * b * h / (layout.tensor if layout.sequence_parallel else 1)
    # The ALiBi + causal bias every block of the stage shares (bloomtrain/model/bloom.py): the rank's heads
    # x s x s, in fp32 whenever the attention computes in fp32 (fp32 runs, and half precision with
    # model.attention_softmax_in_fp32).
    bias_bytes = 2 if precision != "fp32" and not model.attention_softmax_in_fp32 else 4
    bias = bias_bytes * model.num_attention_heads / layout.tensor * s * s
    activations = in_flight * (blocks * per_layer + embedding) + bias
    if layout.activation_checkpointing:  # one block's full activations while it is recomputed
        activations += activation_bytes_per_layer(model, seq_length, layout.micro_batch_size, layout.tensor,
                                                  precision, False, layout.sequence_parallel)
    if layout.pipeline == 1:  # the logits and their fp32 softmax for the loss, on the (only) stage
        activations += (4 + scale * 2) * s * b * model.padded_vocab_size(layout.tensor) / layout.tensor
    bucket = 0.0
    if layout.zero_stage in (1, 2) and params > DEEPSPEED_REDUCE_BUCKET:
        # Up to the cap the gradients move into the bucket and live there (counted as gradients); beyond it
        # the bucket stages them on their way to the partitions, in the model's precision.
        bucket = gradient_bucket_elements(params) * (4.0 if precision == "fp32" else 2.0)
    return Memory(params * weight, params * gradient, params * optimizer, activations, in_flight, bucket)
