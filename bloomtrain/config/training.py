"""``train.*`` and ``optimizer.*``: what one run trains, how long and how it steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from bloomtrain.config.errors import require

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """AdamW with warm-up and decay, as BLOOM was trained."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 6e-5
    """The LR at the end of the decay, kept after it."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    decay_steps: int | None = None
    """Steps over which the LR decays to ``min_lr``; null means ``train.max_steps``."""
    decay_style: str = "cosine"
    """cosine | linear | constant (megatron-core's scheduler)."""
    weight_decay: float = 0.1
    """Applied to weight matrices only, never to biases, norms or embeddings' norm."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay (BLOOM's 0.95)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optimizer.lr must be positive, got {self.lr}")
        require(
            0 <= self.min_lr <= self.lr,
            f"optimizer.min_lr={self.min_lr} must lie in [0, optimizer.lr={self.lr}]",
        )
        require(self.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        require(
            self.decay_style in LR_DECAY_STYLES,
            f"optimizer.decay_style={self.decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}",
        )
        require(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1/beta2 must lie in [0, 1)")
        require(self.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0 disables clipping)")
        require(self.eps > 0, f"optimizer.eps must be positive (BLOOM's is 1e-8), got {self.eps}")


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train for (with ``train.epochs``: computed from the data, this value ignored)."""
    epochs: int | None = None
    """Fine-tuning only: passes over the training examples instead of ``max_steps`` (each epoch a fresh
    seeded shuffle, packed anew; the steps are the packed rows of all epochs // global_batch_size)."""
    loss_normalization: str = "token"
    """Fine-tuning only: token (the loss is the mean over every target token of the global batch) or
    example (the mean over examples of each example's mean target loss: each weighs the same, as BLOOMZ's
    norm-target-loss)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks (gradient accumulation makes up the rest)."""
    rampup_batch_size: list[int] | None = None
    """[start, increment, samples], BLOOM's (and Megatron's) ramp-up: the global batch starts at ``start``
    and grows by ``increment`` at even intervals of consumed samples until ``global_batch_size`` after
    ``samples``; the LR schedule then runs on samples. null: the full batch from the first step."""
    seq_length: int = 128
    """Tokens per training sequence."""
    seed: int = 1234
    """Seeds the initial weights, the data order and every RNG; a resume restores their states."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16."""
    device: str = "auto"
    """auto picks cuda when available, else cpu."""
    compile: bool = False
    """torch.compile each transformer block: its elementwise work fused, the first step paying for the
    compilation. Whether it pays depends on the device and the shape: measure it with
    ``benchmarks/train_throughput.py --against train.compile=true`` (docs/benchmarks.md)."""
    peak_tflops: float | None = None
    """The peak TFLOP/s of one device in train.precision, for MFU; null: a table of known GPUs (dense
    half precision), else measured at start-up (the log says which)."""
    exit_duration_minutes: float = 0.0
    """Wall-clock budget: once exceeded, save a checkpoint at the next step and exit with status 75
    (as after SIGTERM/SIGUSR1) so the job can be requeued; 0 = no budget."""
    max_skipped_steps: int = 10
    """Steps in a row whose loss or gradients are NaN/Inf (each skipped, the optimizer untouched) before
    the run stops with exit status 3, keeping its last good checkpoint."""
    loss_spike_factor: float = 0.0
    """Loss-spike guard: a step whose loss exceeds this factor times the highest loss of the previous
    ``train.loss_spike_window`` steps rolls the run back to its newest checkpoint and skips every sample
    read since (recorded in the checkpoint, so a resume skips them too); 0 = off. Needs checkpoint.interval."""
    loss_spike_window: int = 50
    """Steps of loss history the guard compares with; it is armed once the window is full."""
    loss_spike_max_rollbacks: int = 3
    """Rollbacks allowed in a run; one more spike stops it with exit status 3."""
    inject_loss_spike_at: list[int] = field(default_factory=list)
    """Testing the guard (as Megatron-LM's error injection): the loss the guard sees the first time the run
    reaches each of these steps is multiplied by 1000. Training itself is unchanged."""
    inject_nonfinite_at: list[int] = field(default_factory=list)
    """Testing the non-finite guard: the loss the guard sees the first time the run reaches each of these
    steps is NaN (the step counts as skipped; training itself is unchanged)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "global_batch_size", "seq_length"):
            require(getattr(self, key) > 0, f"train.{key} must be positive, got {getattr(self, key)}")
        require(self.exit_duration_minutes >= 0, "train.exit_duration_minutes must be >= 0 (0 = no budget)")
        require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        if self.rampup_batch_size is not None:
            ramp = list(self.rampup_batch_size)
            require(len(ramp) == 3 and all(isinstance(v, int) for v in ramp),
                    f"train.rampup_batch_size={ramp} must be [start, increment, samples], e.g. [192, 16, 9765625]")
            start, increment, samples = ramp
            require(0 < start <= self.global_batch_size and increment > 0 and samples >= 0,
                    f"train.rampup_batch_size={ramp}: start must lie in (0, train.global_batch_size="
                    f"{self.global_batch_size}], the increment be positive and the samples >= 0")
            require((self.global_batch_size - start) % increment == 0,
                    f"train.rampup_batch_size={ramp}: train.global_batch_size={self.global_batch_size} - {start} "
                    f"is not a multiple of the increment {increment}")
        require(self.epochs is None or self.epochs >= 1, f"train.epochs must be >= 1 or null, got {self.epochs}")
        require(self.loss_normalization in ("token", "example"),
                f"train.loss_normalization={self.loss_normalization!r} is not token or example")
        require(self.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1")
        require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
                f"train.loss_spike_factor must be 0 (off) or above 1, got {self.loss_spike_factor}")
        require(self.loss_spike_window >= 1, "train.loss_spike_window must be >= 1")
        require(self.loss_spike_max_rollbacks >= 0, "train.loss_spike_max_rollbacks must be >= 0")
        require(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops must be positive or null")
        require(
            self.precision in PRECISIONS,
            f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}",
        )
        require(self.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda")
