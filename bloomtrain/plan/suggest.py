"""The layouts of a cluster that fit a model, fastest first."""

from __future__ import annotations

import math

from bloomtrain.config import BloomTrainConfig
from bloomtrain.plan.estimate import Plan, plan_of, ramp_of
from bloomtrain.plan.memory import PlannedLayout


def candidate_layouts(config: BloomTrainConfig, world_size: int, gpus_per_node: int) -> list[PlannedLayout]:
    """Every layout of ``world_size`` GPUs worth considering: tensor within a node (a power of two dividing
    the heads), pipeline stages of at least two blocks, micro-batches that divide the batch, ZeRO 0-1
    with pipelines (DeepSpeed's limit) and 0-3 without, activation checkpointing off or on."""
    model, batch, ramp = config.model, config.train.global_batch_size, ramp_of(config)
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
                        layouts.append(PlannedLayout(tensor, pipeline, data, zero, tensor > 1, micro, recompute))
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
