"""``parallel.*`` and ``distributed.*``: the layout of the ranks and how long they wait for each other."""

from __future__ import annotations

from dataclasses import dataclass

from bloomtrain.config.errors import require


@dataclass
class ParallelConfig:
    """The (tensor, pipeline, data) layout; rank order in ``bloomtrain/parallel/layout.py``."""

    tensor: int = 1
    """Tensor-parallel size (megatron-core layers); must divide model.num_attention_heads."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed PipelineModule, 1F1B); at most model.num_layers."""
    data: str = "auto"
    """Data-parallel size, or auto = world_size / (tensor x pipeline)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3; with pipeline > 1 only 0 or 1. BLOOM's (and the default) is 1, which
    also makes checkpoints resumable under another layout (DeepSpeed's universal checkpoint)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them."""
    sequence_parallel: bool = False
    """Split LayerNorm/residual activations along the sequence over the tensor group (megatron-core's
    sequence parallelism); saves activation memory when parallel.tensor > 1, no effect otherwise."""

    def __post_init__(self) -> None:
        require(self.tensor >= 1, f"parallel.tensor must be >= 1, got {self.tensor}")
        require(self.pipeline >= 1, f"parallel.pipeline must be >= 1, got {self.pipeline}")
        require(
            self.data == "auto" or (str(self.data).isdigit() and int(self.data) >= 1),
            f"parallel.data must be 'auto' or a positive integer, got {self.data!r}",
        )
        require(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class DistributedConfig:
    """How long ranks wait for each other."""

    timeout_minutes: float = 10.0
    """Bound on every collective during start-up, evaluation and checkpoint saving, and on the steps until
    their time is known: when a peer died or hangs, the other ranks stop after this long with a message
    naming the collective, instead of waiting (gloo's and NCCL's default is 30 minutes)."""
    step_timeout_factor: float = 20.0
    """Once the first steps are timed, a collective inside a step gives up after this many median steps
    (at least ``distributed.min_step_timeout_seconds``): bloom-tiny's 0.1 s step after a minute, BLOOM-176B's
    2.4-minute step after 47 minutes (docs/reliability.md). 0 keeps ``timeout_minutes`` throughout."""
    min_step_timeout_seconds: float = 60.0
    """The shortest bound a step's collectives get, however short the step."""

    def __post_init__(self) -> None:
        require(self.timeout_minutes > 0, "distributed.timeout_minutes must be positive")
        require(self.step_timeout_factor >= 0, "distributed.step_timeout_factor must be >= 0 (0 = off)")
        require(self.min_step_timeout_seconds > 0, "distributed.min_step_timeout_seconds must be positive")
