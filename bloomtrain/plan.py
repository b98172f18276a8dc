"""Planning a run before it costs a cluster: memory per GPU, tokens, steps and days, and layouts that fit.

``python -m bloomtrain.plan [key=value ...]`` prints the plan of a config (the same table
``launch.dry_run=true`` prints and every run logs at start); with ``launch.suggest=true`` it ranks the
layouts that fit ``launch.nodes`` x ``launch.slurm.gpus_per_node`` GPUs of ``launch.gpu``.

Every formula is in docs/planning.md. In short, per GPU (the first pipeline stage, which holds the
embedding and the most micro-batches in flight): parameters, gradients and optimizer state from the
exact parameters that rank holds (the model's own shapes, split as ``parallel/names.py`` splits them,
stages balanced as DeepSpeed's ``PipelineModule`` balances them), bytes by precision and ZeRO stage;
activations per layer and micro-batch after Korthikanti et al. (2022); time from the model FLOPs
(``flops.py``) at an assumed MFU, with the pipeline bubble and the data-parallel all-reduce.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from functools import cache

from bloomtrain.config import BloomTrainConfig, ConfigError, ModelConfig
from bloomtrain.flops import model_flops_per_step
from bloomtrain.parallel.layout import DEEPSPEED_REDUCE_BUCKET, gradient_bucket_elements
from bloomtrain.parallel.names import pipeline_layers, shard_dim

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    memory_gb: float  # GiB the framework can use
    half_precision_tflops: float  # dense bf16/fp16 peak
    intra_node_gb_s: float  # NVLink/NVSwitch bandwidth per GPU (one direction)
    inter_node_gb_s: float  # network bandwidth per GPU (one direction)


GPUS = {
    # Datasheet numbers; inter-node: 4 x 200 Gb/s HDR per 8-GPU node for A100, 8 x 400 Gb/s NDR for H100.
    "A100-40GB": Gpu(40, 312, 300, 12.5),
    "A100-80GB": Gpu(80, 312, 300, 12.5),
    "H100-80GB": Gpu(80, 989, 450, 50),
    "H200-141GB": Gpu(141, 989, 450, 50),
    "V100-32GB": Gpu(32, 125, 150, 12.5),
}


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    zero_stage: int
    activation_checkpointing: bool
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

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


# ----------------------------------------------------------------------------------------- parameters

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


# -------------------------------------------------------------------------------------------- memory

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


def estimate_memory(model: ModelConfig, layout: Layout, precision: str, seq_length: int,
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


# ---------------------------------------------------------------------------------------------- time

@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    data_parallel_s: float
    tensor_parallel_s: float

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.data_parallel_s + self.tensor_parallel_s


def estimate_step_time(model: ModelConfig, layout: Layout, precision: str, seq_length: int, global_batch_size: int,
                       gpu: Gpu, mfu: float, gpus_per_node: int) -> StepTime:
    """Seconds per optimizer step: model FLOPs at ``mfu`` of the peak (recomputation adds a third of the
    forward), the 1F1B bubble ((p - 1) / m of the compute), and communication not hidden by it: the
    data-parallel gradient all-reduce (ring: 2 (d-1)/d of the gradients), and the tensor-parallel
    all-reduces (4 per block and micro-batch, forward and backward) over NVLink."""
    flops = model_flops_per_step(model, global_batch_size, seq_length)
    if layout.activation_checkpointing:
        flops *= 4 / 3
    peak = gpu.half_precision_tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    compute = flops / (layout.world_size * peak * mfu)
    micro_batches = global_batch_size // (layout.micro_batch_size * layout.data)
    bubble = compute * (layout.pipeline - 1) / micro_batches
    bytes_per_grad = 4.0 if precision == "fp32" else 2.0
    params = stage_parameters(model, layout.tensor, layout.pipeline)[0]
    crosses_nodes = layout.tensor * layout.pipeline < layout.world_size and layout.world_size > gpus_per_node
    bandwidth = (gpu.inter_node_gb_s if crosses_nodes else gpu.intra_node_gb_s) * 1e9
    data_parallel = 2 * (layout.data - 1) / layout.data * params * bytes_per_grad / bandwidth
    tensor_parallel = 0.0
    if layout.tensor > 1:
        blocks = max(blocks_per_stage(model.num_layers, layout.pipeline))
        volume = 2 * (layout.tensor - 1) / layout.tensor * seq_length * layout.micro_batch_size * model.hidden_size
        link = (gpu.intra_node_gb_s if layout.tensor <= gpus_per_node else gpu.inter_node_gb_s) * 1e9
        passes = 6 if layout.activation_checkpointing else 4
        tensor_parallel = passes * blocks * micro_batches * volume * bytes_per_grad / link
    return StepTime(compute, bubble, data_parallel, tensor_parallel)


# ---------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    gpu_name: str
    gpu_memory_bytes: float
    step: StepTime
    steps: int
    samples: int  # over all the steps, ramp-up included
    tokens_per_step: int  # of a full step
    mfu: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_bytes

    global_batch_size: int

    @property
    def days(self) -> float:
        """A ramp-up step costs its share of a full one."""
        return self.samples / self.global_batch_size * self.step.total / 86400

    @property
    def tokens(self) -> int:
        return self.samples * self.tokens_per_step // self.global_batch_size

    def table(self) -> str:
        m, g = self.memory, GIB
        rows = [
            ("layout", self.layout.describe()),
            ("memory per GPU", f"{m.total / g:,.1f} GiB of {self.gpu_memory_bytes / g:,.0f} GiB ({self.gpu_name})"
                               f"{'' if self.fits else '  -- DOES NOT FIT'}"),
            ("  parameters", f"{m.parameters / g:,.2f} GiB"),
            ("  gradients", f"{m.gradients / g:,.2f} GiB"),
            ("  optimizer state", f"{m.optimizer / g:,.2f} GiB"),
            ("  gradient bucket", f"{m.gradient_bucket / g:,.2f} GiB"),
            ("  activations", f"{m.activations / g:,.2f} GiB ({m.in_flight} micro-batch"
                              f"{'es' if m.in_flight > 1 else ''} in flight)"),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            ("step time", f"{self.step.total:,.2f} s at {self.mfu:.0%} MFU (compute {self.step.compute_s:.2f}, "
                          f"bubble {self.step.bubble_s:.2f}, data-parallel {self.step.data_parallel_s:.2f}, "
                          f"tensor-parallel {self.step.tensor_parallel_s:.2f})"),
            ("steps and days", f"{self.steps:,} steps, {self.tokens / 1e9:,.1f}B tokens, {self.days:,.1f} days"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}} : {value}" for name, value in rows)


def gpu_of(config: BloomTrainConfig) -> tuple[str, Gpu, float]:
    """(name, GPU, usable bytes) for ``launch.gpu`` / ``launch.gpu_memory_gb``."""
    launch = config.launch
    gpu = GPUS[launch.gpu]  # validated at start-up against config.PLANNED_GPUS
    memory = (launch.gpu_memory_gb or gpu.memory_gb) * GIB
    return launch.gpu, gpu, memory


def plan_of(config: BloomTrainConfig, layout: Layout) -> Plan:
    name, gpu, memory = gpu_of(config)
    train, launch = config.train, config.launch
    gpus_per_node = launch.slurm.gpus_per_node or 8
    return Plan(layout, estimate_memory(config.model, layout, train.precision, train.seq_length,
                                        train.global_batch_size), name, memory,
                estimate_step_time(config.model, layout, train.precision, train.seq_length, train.global_batch_size,
                                   gpu, launch.assumed_mfu, gpus_per_node),
                train.max_steps, run_samples(train.global_batch_size, _ramp(config), train.max_steps),
                train.global_batch_size * train.seq_length, launch.assumed_mfu, train.global_batch_size)


def _ramp(config: BloomTrainConfig) -> tuple[int, int, int] | None:
    ramp = config.train.rampup_batch_size
    return tuple(ramp) if ramp else None


@cache
def run_samples(global_batch_size: int, ramp: tuple[int, int, int] | None, steps: int) -> int:
    """Samples ``steps`` steps consume, ramp-up included (the schedule the trainer follows)."""
    from bloomtrain.data.loader import BatchLayout

    return BatchLayout(1, global_batch_size, rampup=ramp).samples_for(steps)


def layout_of(config: BloomTrainConfig, data: int) -> Layout:
    parallel = config.parallel
    return Layout(parallel.tensor, parallel.pipeline, data, config.train.micro_batch_size, parallel.zero_stage,
                  parallel.activation_checkpointing, parallel.sequence_parallel)


# ------------------------------------------------------------------------------------------ suggester

def candidate_layouts(config: BloomTrainConfig, world_size: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of ``world_size`` GPUs worth considering: tensor within a node (a power of two dividing
    the heads), pipeline stages of at least two blocks, micro-batches that divide the batch, ZeRO 0-1
    with pipelines (DeepSpeed's limit) and 0-3 without, activation checkpointing off or on."""
    model, batch, ramp = config.model, config.train.global_batch_size, _ramp(config)
    layouts = []
    for tensor in (t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and model.num_attention_heads % t == 0):
        for pipeline in range(1, model.num_layers // 2 + 1):
            if world_size % (tensor * pipeline):
                continue
            data = world_size // (tensor * pipeline)
            for micro in (1, 2, 4, 8):
                if batch % (micro * data) or (ramp and (ramp[0] % (micro * data) or ramp[1] % (micro * data))):
                    continue
                for zero in ((0, 1) if pipeline > 1 else (0, 1, 2, 3)):
                    for recompute in (False, True):
                        layouts.append(Layout(tensor, pipeline, data, micro, zero, recompute, tensor > 1))
    return layouts


def suggest(config: BloomTrainConfig, top: int = 5) -> tuple[list[Plan], int]:
    """The fastest layouts that fit, fastest first, and how many were considered."""
    launch = config.launch
    gpus_per_node = launch.slurm.gpus_per_node or 8
    layouts = candidate_layouts(config, launch.nodes * gpus_per_node, gpus_per_node)
    plans = [plan_of(config, layout) for layout in layouts]
    # Equal times (to 0.1%): the one with more memory to spare first.
    fitting = sorted((plan for plan in plans if plan.fits),
                     key=lambda plan: (round(plan.step.total, -int(math.floor(math.log10(plan.step.total))) + 2),
                                       plan.memory.total))
    return fitting[:top] if top else fitting, len(plans)


def main(argv: list[str] | None = None) -> int:
    from bloomtrain.config_loader import load_config

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        config = load_config(list(sys.argv[1:] if argv is None else argv))
        if config.launch.suggest:
            return _print_suggestions(config)
        from bloomtrain.launch import process_count
        from bloomtrain.parallel.layout import resolve_layout

        layout = resolve_layout(config, process_count(config))
        print(plan_of(config, layout_of(config, layout.data)).table())
    except ConfigError as error:
        print(f"bloomtrain.plan: config error: {error}", file=sys.stderr)
        return 2
    return 0


def _print_suggestions(config: BloomTrainConfig) -> int:
    launch = config.launch
    plans, considered = suggest(config, top=0)
    world = launch.nodes * (launch.slurm.gpus_per_node or 8)
    if not plans:
        print(f"bloomtrain.plan: none of {considered} layouts of {world} x {launch.gpu} fits {config.model.name}; "
              "add nodes, lower train.micro_batch_size or train.seq_length", file=sys.stderr)
        return 1
    print(f"{len(plans)} of {considered} layouts of {world} x {launch.gpu} fit {config.model.name}; the fastest "
          f"by estimated step time at {launch.assumed_mfu:.0%} MFU:")
    for rank, plan in enumerate(plans[:launch.suggest_top], start=1):
        print(f"{rank:>3}. {plan.layout.describe():<32} {plan.memory.total / GIB:6.1f} GiB  "
              f"{plan.step.total:7.2f} s/step  {plan.days:7.1f} days")
    best = plans[0]
    print(f"\nwhy {best.layout.describe()}:\n{best.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
