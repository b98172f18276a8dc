"""``launch.*`` and ``launcher``: how ``bloomtrain.launch`` starts the ranks, and what the plan sizes for."""

from __future__ import annotations

from dataclasses import dataclass, field

from bloomtrain.config.errors import require
from bloomtrain.gpus import PLANNED_GPUS


@dataclass
class SlurmLaunchConfig:
    """``launcher=slurm``: the batch job ``bloomtrain.launch`` writes to ``RUN_DIR/slurm/job.sh`` and submits."""

    partition: str | None = None
    """SLURM partition (``--partition``); null: the cluster's default."""
    account: str | None = None
    """SLURM account to charge (``--account``); null: the user's default."""
    time_minutes: int | None = None
    """The job's time limit; null: the partition's default."""
    gpus_per_node: int = 0
    """GPUs per node; with ``parallel.data=auto`` the job starts this many ranks per node. 0: CPU nodes."""
    cpus_per_task: int | None = None
    """CPUs for each node's task (all of that node's ranks); null: the cluster's default."""
    mem_gb: int | None = None
    """Memory per node in GB (``--mem``); null: the cluster's default."""
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
    """The SLURM job, with ``launcher=slurm``."""
    dry_run: bool = False
    """Print the plan and the command, start nothing."""
    stop_grace_seconds: int = 600
    """After SIGTERM/SIGUSR1, how long torchrun lets the ranks finish their step and save before killing them."""
    gpu: str = "A100-80GB"
    """The GPU the plan (dry run, run start, ``bloomtrain.plan``) sizes memory and time for: A100-40GB,
    A100-80GB, H100-80GB, H200-141GB, V100-32GB (the table in bloomtrain/gpus.py)."""
    gpu_memory_gb: float | None = None
    """Usable GiB per GPU for the plan; null: the GPU's."""
    assumed_mfu: float = 0.4
    """The fraction of the GPU's peak the plan's step time and days assume for a step's FLOPs (its MFU
    without activation checkpointing; recomputation adds a third of the work at the same rate).
    BLOOM-176B ran at about 0.48 of the A100's peak, recomputation counted."""
    suggest: bool = False
    """``python -m bloomtrain.plan launch.suggest=true``: rank the layouts that fit instead of planning one."""
    suggest_top: int = 5
    """How many layouts ``launch.suggest=true`` lists."""
    hang_warning_minutes: float = 5.0
    """Warn when a rank has not written its heartbeat (RUN_DIR/heartbeats, every 5 s while it runs) for this
    long while another has, before the rank's step time is known; 0 = never. The ranks themselves give up
    at the collective timeout (``distributed.*``)."""
    hang_warning_factor: float = 10.0
    """Once a rank's heartbeat carries its median step time: warn after this many of them (at least 30 s)."""

    def __post_init__(self) -> None:
        require(self.processes is None or self.processes >= 1, "launch.processes must be >= 1 or null")
        require(self.nodes >= 1, "launch.nodes must be >= 1")
        require(self.processes is None or self.processes % self.nodes == 0,
                f"launch.processes={self.processes} must divide evenly over launch.nodes={self.nodes}")
        require(self.rendezvous is None or ":" in self.rendezvous,
                f"launch.rendezvous={self.rendezvous!r} must be HOST:PORT")
        require(self.stop_grace_seconds >= 1, "launch.stop_grace_seconds must be >= 1")
        require(self.hang_warning_minutes >= 0, "launch.hang_warning_minutes must be >= 0 (0 = never)")
        require(self.hang_warning_factor > 0, "launch.hang_warning_factor must be positive")
        require(self.gpu in PLANNED_GPUS, f"launch.gpu={self.gpu!r} is not one of {', '.join(PLANNED_GPUS)}; "
                "pick the closest and set launch.gpu_memory_gb")
        require(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "launch.gpu_memory_gb must be positive or null")
        require(0 < self.assumed_mfu <= 1, f"launch.assumed_mfu must lie in (0, 1], got {self.assumed_mfu}")
        require(self.suggest_top >= 1, "launch.suggest_top must be >= 1")
