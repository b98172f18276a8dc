"""Planning a run before it costs a cluster: memory per GPU, tokens, steps and days, and layouts that fit.

``python -m bloomtrain.plan [key=value ...]`` prints the plan of a config (the same table
``launch.dry_run=true`` prints and every run logs at start); with ``launch.suggest=true`` it ranks the
layouts that fit ``launch.nodes`` x ``launch.slurm.gpus_per_node`` GPUs of ``launch.gpu``.

Every formula is in docs/planning.md. In short, per GPU (the first pipeline stage, which holds the
embedding and the most micro-batches in flight): parameters, gradients and optimizer state from the
exact parameters that rank holds (the model's own shapes, split as ``parallel/names.py`` splits them,
stages balanced as DeepSpeed's ``PipelineModule`` balances them), bytes by precision and ZeRO stage
(``memory.py``); activations per layer and micro-batch after Korthikanti et al. (2022); time from the
model FLOPs (``flops.py``) at an assumed MFU, with the pipeline bubble and the data-parallel all-reduce
(``step_time.py``); the whole run (``estimate.py``) and the suggester (``suggest.py``).
"""

from bloomtrain.plan.estimate import Plan, gpu_of, layout_of, plan_of, plan_table, run_samples
from bloomtrain.plan.memory import (
    GIB,
    Memory,
    PlannedLayout,
    activation_bytes_per_layer,
    blocks_per_stage,
    estimate_memory,
    stage_parameters,
    state_bytes_per_parameter,
)
from bloomtrain.plan.step_time import StepTime, estimate_step_time
from bloomtrain.plan.suggest import candidate_layouts, suggest

__all__ = [
    "GIB", "Memory", "Plan", "PlannedLayout", "StepTime", "activation_bytes_per_layer", "blocks_per_stage",
    "candidate_layouts", "estimate_memory", "estimate_step_time", "gpu_of", "layout_of", "plan_of", "plan_table",
    "run_samples",
    "stage_parameters", "state_bytes_per_parameter", "suggest",
]
