"""The root config of ``python -m bloomtrain.train``, and the checks that span its slices."""

from __future__ import annotations

from dataclasses import dataclass, field

from bloomtrain.config.data import DataConfig, EvalConfig
from bloomtrain.config.errors import require, require_finite_numbers
from bloomtrain.config.launch import LaunchConfig
from bloomtrain.config.model import ModelConfig
from bloomtrain.config.parallel import DistributedConfig, ParallelConfig
from bloomtrain.config.run import CheckpointConfig, LoggingConfig, RunConfig
from bloomtrain.config.training import OptimizerConfig, TrainConfig


@dataclass
class BloomTrainConfig:
    """The root config of ``python -m bloomtrain.train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder's shape (``model=NAME`` picks a preset)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batches, precision and the numerical guards."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and its LR schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The tensor x pipeline x data layout and ZeRO."""
    data: DataConfig = field(default_factory=DataConfig)
    """What the run reads."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation during training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save, what to keep, where to resume from."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """The progress line, W&B and TensorBoard."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run's name and directory."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How ``bloomtrain.launch`` starts the ranks, and what the plan sizes for."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Bounds on waiting for other ranks."""
    launcher: str = "local"
    """local (torchrun on this machine) | slurm (an sbatch job that requeues itself after a stop; launch.slurm.*)."""

    def __post_init__(self) -> None:
        require_finite_numbers(self, "")
        require(
            self.train.global_batch_size % self.train.micro_batch_size == 0,
            f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={self.train.micro_batch_size}; make it one",
        )
        require(self.launcher in ("local", "slurm"),
                f"launcher={self.launcher!r} is not local (torchrun on this machine) or slurm (sbatch)")
        require(self.launcher == "slurm" or self.launch.nodes == 1 or self.launch.rendezvous,
                f"launch.nodes={self.launch.nodes} needs launcher=slurm, or launch.rendezvous=HOST:PORT "
                "with bloomtrain.launch started on every node")
        require(not self.train.loss_spike_factor or self.checkpoint.interval > 0,
                "train.loss_spike_factor rolls back to the newest checkpoint: set checkpoint.interval > 0")
        fine_tuning = self.data.kind == "finetune"
        require(fine_tuning or self.train.epochs is None,
                "train.epochs counts passes over fine-tuning examples; with data.kind=pretraining use train.max_steps")
        require(self.eval.metric == "loss" or (bool(self.eval.tasks) and "/" in self.eval.metric),
                f"eval.metric={self.eval.metric!r} must be loss or TASK/METRIC of a task in eval.tasks "
                "(e.g. eval.tasks=[nusax_sentiment] eval.metric=nusax_sentiment/f1)")
        decay_steps = self.optimizer.decay_steps or self.train.max_steps
        require(
            self.optimizer.warmup_steps < decay_steps,
            f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be smaller than the decay "
            f"length ({decay_steps}); lower it or raise train.max_steps / optimizer.decay_steps",
        )
