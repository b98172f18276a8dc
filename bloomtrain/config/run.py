"""``run.*``, ``checkpoint.*`` and ``logging.*``: where a run lives, what it keeps and what it reports."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bloomtrain.config.errors import require

WANDB_MODES = ("offline", "online", "disabled")


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

    init_from: str | None = None
    """Start a new run from these weights only (a bloomtrain run or checkpoint of any layout, or a Hugging
    Face BLOOM folder): a fresh optimizer, LR schedule and step count. Ignored once run.dir has checkpoints
    of its own (a resume continues those)."""

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
    """W&B project the run is logged under."""
    entity: str | None = None
    """W&B team or user; null: the logged-in user's default."""

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
    """Weights & Biases."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard/."""

    def __post_init__(self) -> None:
        require(self.interval >= 1, "logging.interval must be >= 1")
