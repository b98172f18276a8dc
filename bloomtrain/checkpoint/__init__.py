"""Checkpoints: one manager that saves and restores a run (``manager.py``), the on-disk format and its
manifest (``store.py``), resuming under another layout (``universal.py``), a checkpoint's weights for
export (``weights.py``), RNG states (``rng.py``) and weights-only loading (``safe_load.py``)."""

from bloomtrain.checkpoint.store import (
    CheckpointError,
    TrainingProgress,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from bloomtrain.checkpoint.weights import read_model_weights, write_model_only_checkpoint

__all__ = ["CheckpointError", "TrainingProgress", "latest_checkpoint", "read_meta", "read_model_weights",
           "resolve_checkpoint", "write_model_only_checkpoint"]
