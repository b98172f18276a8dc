"""Saving and restoring a run: ``RUN_DIR/checkpoints/step_N/`` plus a ``latest`` pointer.

A checkpoint directory holds
  - ``model.safetensors``: the model weights (no pickle),
  - ``trainer_state.pt``: optimizer, LR scheduler and RNG states, read back with ``weights_only=True``,
  - ``meta.json``: step, consumed samples, the model config and the W&B run id.
Saves are written to ``step_N.tmp`` and renamed into place, and ``latest`` is replaced last, so a
crash mid-save leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bloomtrain.config import ModelConfig

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
LATEST = "latest"


@dataclass
class TrainingProgress:
    """Where training stands: what a resume needs besides the tensors."""

    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None


def save_checkpoint(checkpoints_dir: Path, model: torch.nn.Module, model_config: ModelConfig,
                    progress: TrainingProgress, trainer_state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``step_N`` atomically, point ``latest`` at it, and prune to the newest ``keep``."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{progress.step}"
    staging = checkpoints_dir / f"step_{progress.step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(staging / MODEL_FILE))
    torch.save({**trainer_state, "rng": _rng_state()}, staging / STATE_FILE)
    meta = {"progress": dataclasses.asdict(progress), "model": dataclasses.asdict(model_config)}
    (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    _fsync_dir(staging)

    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_atomically(checkpoints_dir / LATEST, final.name)
    if keep:
        _prune(checkpoints_dir, keep)
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST
    if not pointer.exists():
        return None
    path = checkpoints_dir / pointer.read_text().strip()
    return path if (path / META_FILE).exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / META_FILE).exists():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(f"no bloomtrain checkpoint at {path} (expected {META_FILE} or a '{LATEST}' pointer)")


def read_meta(checkpoint: Path) -> tuple[ModelConfig, TrainingProgress]:
    meta = json.loads((checkpoint / META_FILE).read_text())
    return ModelConfig(**meta["model"]), TrainingProgress(**meta["progress"])


def load_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / MODEL_FILE))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    state = torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
    _set_rng_state(state.pop("rng"))
    return state


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray; store it as a tensor so weights_only loading accepts it.
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _fsync_dir(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _prune(checkpoints_dir: Path, keep: int) -> None:
    steps = sorted(
        (p for p in checkpoints_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
