"""``data.*`` and ``eval.*``: what the run reads and how it is validated."""

from __future__ import annotations

from dataclasses import dataclass

from bloomtrain.config.errors import require


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
