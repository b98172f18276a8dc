"""Time per step: the model's FLOPs at an assumed MFU, the pipeline bubble, and the communication
that the bubble does not hide (docs/planning.md)."""

from __future__ import annotations

from dataclasses import dataclass

from bloomtrain.config import ModelConfig
from bloomtrain.flops import model_flops_per_step
from bloomtrain.gpus import Gpu
from bloomtrain.plan.memory import PlannedLayout, blocks_per_stage, stage_parameters


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    data_parallel_s: float
    tensor_parallel_s: float

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.data_parallel_s + self.tensor_parallel_s


def estimate_step_time(model: ModelConfig, layout: PlannedLayout, precision: str, seq_length: int,
                       global_batch_size: int, gpu: Gpu, mfu: float, gpus_per_node: int) -> StepTime:
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
