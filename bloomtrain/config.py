"""Typed configuration: the dataclass schemas Hydra composes into, and their validation.

Every field is documented here; YAML files under ``conf/`` only fill in values. Validation runs once,
in ``__post_init__``, when :func:`bloomtrain.config_loader.load_config` turns the composed OmegaConf
tree into these objects. A user error raises :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value a user must change; the message names the key and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


PRECISIONS = ("fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PLANNED_GPUS = ("A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "V100-32GB")  # bloomtrain/plan.py's table


@dataclass
class ModelConfig:
    """Shape of the BLOOM decoder. Presets live in ``conf/model/``."""

    name: str = "bloom-tiny"
    """Preset name, recorded for the run's metadata."""
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    vocab_size: int = 4096
    """Real vocabulary size; the embedding is padded up to a multiple of ``vocab_pad_multiple``."""
    vocab_pad_multiple: int = 128
    """Padding granularity of the embedding (multiplied by the tensor-parallel size)."""
    layer_norm_epsilon: float = 1e-5
    init_std: float | None = None
    """Std of the normal init; null means sqrt(1 / (3 * hidden_size)), which gives BLOOM-176B's 0.0048."""
    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in fp32 when training in bf16/fp16, as BLOOM did."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "vocab_pad_multiple"):
            require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.num_attention_heads={self.num_attention_heads} does not divide "
            f"model.hidden_size={self.hidden_size}; pick a head count that divides the hidden size",
        )
        require(
            self.init_std is None or self.init_std > 0,
            f"model.init_std must be positive or null, got {self.init_std}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(1.0 / (3.0 * self.hidden_size))

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        multiple = self.vocab_pad_multiple * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class OptimizerConfig:
    """AdamW with warm-up and decay, as BLOOM was trained."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 20
    decay_steps: int | None = None
    """Steps over which the LR decays to ``min_lr``; null means ``train.max_steps``."""
    decay_style: str = "cosine"
    weight_decay: float = 0.1
    """Applied to weight matrices only, never to biases, norms or embeddings' norm."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
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
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks (gradient accumulation makes up the rest)."""
    rampup_batch_size: list[int] | None = None
    """[start, increment, samples], BLOOM's (and Megatron's) ramp-up: the global batch starts at ``start``
    and grows by ``increment`` at even intervals of consumed samples until ``global_batch_size`` after
    ``samples``; the LR schedule then runs on samples. null: the full batch from the first step."""
    seq_length: int = 128
    seed: int = 1234
    precision: str = "fp32"
    """fp32 | bf16 | fp16."""
    device: str = "auto"
    """auto picks cuda when available, else cpu."""
    compile: bool = False
    """torch.compile each transformer block: its elementwise work fused, the first step paying for the
    compilation (about 25 s here). Measured side by side on this CPU it does not pay (bloom-tiny's
    step was slower compiled, a 110M model's the same; docs/benchmarks.md); on GPUs, where that
    elementwise work is a larger share, measure before relying on it."""
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
class DataConfig:
    blend: str | None = None
    """Blend file written by the data pipeline; null trains on the bundled multilingual sample."""
    cache_dir: str = "~/.cache/bloomtrain"
    """Where the bundled sample's tokenizer and tokens are prepared on first use."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass
class EvalConfig:
    """Validation on each language's held-out tokens (the blend's ``valid_prefix`` files)."""

    interval: int = 1000
    """Evaluate every N optimizer steps and after the last one; 0 = never."""
    iters: int = 10
    """Global batches per language in one evaluation: the same fixed samples every time."""
    early_stop_patience: int = 0
    """Stop (with a checkpoint, exit 0) after this many evaluations without a new best validation loss;
    0 = never."""

    def __post_init__(self) -> None:
        require(self.interval >= 0, "eval.interval must be >= 0 (0 = no evaluation)")
        require(self.iters >= 1, "eval.iters must be >= 1")
        require(self.early_stop_patience >= 0, "eval.early_stop_patience must be >= 0 (0 = never)")


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep: int = 2
    """How many of the newest checkpoints to keep; 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, for good; 0 = none."""
    resume: str = "auto"
    """auto: resume from run.dir's newest complete checkpoint, if any; false: start afresh (refused when
    run.dir already has checkpoints); or a path to a checkpoint / run directory to start from."""

    on_error: str = "stop"
    """When a save fails (disk full, I/O error; the previous checkpoint stays latest): stop, with one
    line and exit status 1, or continue training and try again at the next interval."""

    def __post_init__(self) -> None:
        require(self.on_error in ("stop", "continue"),
                f"checkpoint.on_error={self.on_error!r} is not stop or continue")
        require(self.interval >= 0, "checkpoint.interval must be >= 0 (0 saves only at the end)")
        require(self.keep >= 0, "checkpoint.keep must be >= 0 (0 keeps all)")
        require(self.keep_every >= 0, "checkpoint.keep_every must be >= 0 (0 = none)")
        require(str(self.resume) != "", "checkpoint.resume must be auto, false or a path")


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default) | online (needs WANDB_API_KEY or a wandb login) | disabled."""
    project: str = "bloomtrain"
    entity: str | None = None

    def __post_init__(self) -> None:
        require(
            self.mode in WANDB_MODES,
            f"logging.wandb.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}",
        )


@dataclass
class LoggingConfig:
    interval: int = 10
    """Print a progress line every N steps when stdout is not a terminal."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard/."""

    def __post_init__(self) -> None:
        require(self.interval >= 1, "logging.interval must be >= 1")


@dataclass
class RunConfig:
    name: str = "bloomtrain"
    """A plain name (letters, digits, ``.``, ``_``, ``-``): the default run directory, W&B's and SLURM's job name."""
    dir: str = "runs/${run.name}"
    """The run directory: config.yaml, metrics.jsonl, checkpoints/, wandb/."""

    def __post_init__(self) -> None:
        # A name is not a path: "../x" would put the default run directory elsewhere, and it reaches a job script.
        require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.name) is not None,
                f"run.name={self.name!r} must be a plain name (letters, digits, '.', '_', '-'); "
                "set run.dir for a directory elsewhere")


@dataclass
class SlurmLaunchConfig:
    """``launcher=slurm``: the batch job ``bloomtrain.launch`` writes to ``RUN_DIR/slurm/job.sh`` and submits."""

    partition: str | None = None
    account: str | None = None
    time_minutes: int | None = None
    """The job's time limit; null: the partition's default."""
    gpus_per_node: int = 0
    """GPUs per node; with ``parallel.data=auto`` the job starts this many ranks per node. 0: CPU nodes."""
    cpus_per_task: int | None = None
    """CPUs for each node's task (all of that node's ranks); null: the cluster's default."""
    mem_gb: int | None = None
    stop_signal_seconds: int = 300
    """SLURM sends SIGUSR1 this long before the time limit: enough for a step and a checkpoint save."""
    requeue: bool = True
    """After a stop with a checkpoint (not a cancellation), put the job back in the queue to resume."""
    rendezvous_port: int = 29500
    """The port of torchrun's c10d rendezvous on the job's first node."""
    job_name: str | None = None
    """null: ``run.name``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training, e.g. ``[module load cuda/12.4, source /path/venv/bin/activate]``."""
    sbatch_args: list[str] = field(default_factory=list)
    """More sbatch options, quoted for Hydra: ``'launch.slurm.sbatch_args=["--qos=high","--exclusive"]'``."""

    def __post_init__(self) -> None:
        require(self.gpus_per_node >= 0, "launch.slurm.gpus_per_node must be >= 0")
        require(self.stop_signal_seconds >= 0, "launch.slurm.stop_signal_seconds must be >= 0")
        require(self.time_minutes is None or self.time_minutes >= 1, "launch.slurm.time_minutes must be >= 1")
        require(all(arg.startswith("--") for arg in self.sbatch_args),
                "launch.slurm.sbatch_args takes options as sbatch spells them, e.g. [\"--qos=high\"]")


@dataclass
class LaunchConfig:
    """How ``python -m bloomtrain.launch`` starts the per-rank trainers."""

    processes: int | None = None
    """Processes to start on all nodes together; null: tensor x pipeline x data, where data=auto fills the
    visible GPUs (1 on CPU), or under launcher=slurm launch.slurm.gpus_per_node on every node."""
    nodes: int = 1
    """Machines the processes are spread over (evenly); more than one needs launcher=slurm or
    launch.rendezvous."""
    rendezvous: str | None = None
    """HOST:PORT of torchrun's c10d rendezvous when several machines each run ``bloomtrain.launch``
    (the SLURM job sets it); null: this machine only."""
    slurm: SlurmLaunchConfig = field(default_factory=SlurmLaunchConfig)
    dry_run: bool = False
    """Print the plan and the command, start nothing."""
    stop_grace_seconds: int = 600
    """After SIGTERM/SIGUSR1, how long torchrun lets the ranks finish their step and save before killing them."""
    gpu: str = "A100-80GB"
    """The GPU the plan (dry run, run start, ``bloomtrain.plan``) sizes memory and time for: A100-40GB,
    A100-80GB, H100-80GB, H200-141GB, V100-32GB (bloomtrain/plan.py)."""
    gpu_memory_gb: float | None = None
    """Usable GiB per GPU for the plan; null: the GPU's."""
    assumed_mfu: float = 0.4
    """The fraction of the GPU's peak the plan's step time and days assume for a step's FLOPs (its MFU
    without activation checkpointing; recomputation adds a third of the work at the same rate).
    BLOOM-176B ran at about 0.48 of the A100's peak, recomputation counted."""
    suggest: bool = False
    """``python -m bloomtrain.plan launch.suggest=true``: rank the layouts that fit instead of planning one."""
    suggest_top: int = 5
    hang_warning_minutes: float = 5.0
    """Warn when a rank has not finished a step for this long while another has (its heartbeat file in
    RUN_DIR/heartbeats); 0 = never. The ranks themselves give up at distributed.timeout_minutes."""

    def __post_init__(self) -> None:
        require(self.processes is None or self.processes >= 1, "launch.processes must be >= 1 or null")
        require(self.nodes >= 1, "launch.nodes must be >= 1")
        require(self.processes is None or self.processes % self.nodes == 0,
                f"launch.processes={self.processes} must divide evenly over launch.nodes={self.nodes}")
        require(self.rendezvous is None or ":" in self.rendezvous,
                f"launch.rendezvous={self.rendezvous!r} must be HOST:PORT")
        require(self.stop_grace_seconds >= 1, "launch.stop_grace_seconds must be >= 1")
        require(self.hang_warning_minutes >= 0, "launch.hang_warning_minutes must be >= 0 (0 = never)")
        require(self.gpu in PLANNED_GPUS, f"launch.gpu={self.gpu!r} is not one of {', '.join(PLANNED_GPUS)}; "
                "pick the closest and set launch.gpu_memory_gb")
        require(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "launch.gpu_memory_gb must be positive or null")
        require(0 < self.assumed_mfu <= 1, f"launch.assumed_mfu must lie in (0, 1], got {self.assumed_mfu}")
        require(self.suggest_top >= 1, "launch.suggest_top must be >= 1")


@dataclass
class DistributedConfig:
    """How long ranks wait for each other."""

    timeout_minutes: float = 10.0
    """Bound on every collective: when a peer died or hangs, the other ranks stop after this long with a
    message naming the collective, instead of waiting (gloo's and NCCL's default is 30 minutes)."""

    def __post_init__(self) -> None:
        require(self.timeout_minutes > 0, "distributed.timeout_minutes must be positive")


def _require_finite_numbers(config: object, prefix: str) -> None:
    """``inf``/``nan`` pass every range check written as a comparison; refuse them once, everywhere."""
    for name, value in vars(config).items():
        if isinstance(value, float):
            require(math.isfinite(value), f"{prefix}{name}={value} must be a finite number")
        elif hasattr(value, "__dataclass_fields__"):
            _require_finite_numbers(value, f"{prefix}{name}.")


@dataclass
class BloomTrainConfig:
    """The root config of ``python -m bloomtrain.train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    launcher: str = "local"
    """local (torchrun on this machine) | slurm (an sbatch job that requeues itself after a stop; launch.slurm.*)."""

    def __post_init__(self) -> None:
        _require_finite_numbers(self, "")
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
        decay_steps = self.optimizer.decay_steps or self.train.max_steps
        require(
            self.optimizer.warmup_steps < decay_steps,
            f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be smaller than the decay "
            f"length ({decay_steps}); lower it or raise train.max_steps / optimizer.decay_steps",
        )
