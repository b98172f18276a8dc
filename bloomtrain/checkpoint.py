"""Saving and restoring a run: ``RUN_DIR/checkpoints/step_N/`` plus a ``latest`` pointer.

The tensors are written by DeepSpeed's checkpoint engine, one file per model-parallel rank (per
layer under pipeline parallelism) plus ZeRO's optimizer partitions, so every layout saves in parallel.
Beside them, ``meta.json`` records the step, the consumed samples, the model config, the layout and
the W&B run id. Everything else a resume needs (LR scheduler, RNG states) travels in DeepSpeed's
client state.

A save is written as ``step_N.tmp``, renamed to ``step_N`` once every rank has finished, and only then
does ``latest`` move, by an atomic rename, so a crash mid-save leaves the previous checkpoint in force.
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
import torch.distributed as dist

from bloomtrain.config import ModelConfig

META_FILE = "meta.json"
LATEST = "latest"


@dataclass
class TrainingProgress:
    """Where training stands: what a resume needs besides the tensors."""

    step: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None


def save_checkpoint(engine, checkpoints_dir: Path, model_config: ModelConfig, layout: dict[str, int],
                    progress: TrainingProgress, client_state: dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the new checkpoint's directory."""
    is_main = dist.get_rank() == 0
    tag = f"step_{progress.step}"
    staging, final = checkpoints_dir / f"{tag}.tmp", checkpoints_dir / tag
    if is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(checkpoints_dir), tag=staging.name, save_latest=False,
                           client_state={**client_state, "rng": rng_state()})
    dist.barrier()
    if is_main:
        meta = {"progress": dataclasses.asdict(progress), "model": dataclasses.asdict(model_config),
                "layout": layout}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        _fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _write_atomically(checkpoints_dir / LATEST, tag)
        if keep:
            _prune(checkpoints_dir, keep)
    dist.barrier()
    return final


def load_checkpoint(engine, checkpoint: Path) -> dict[str, Any]:
    """Collective: restore model and optimizer into ``engine`` and the RNG states; return the client state."""
    _, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {checkpoint}")
    set_rng_state(client_state.pop("rng"))
    return client_state


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


def read_meta(checkpoint: Path) -> tuple[ModelConfig, TrainingProgress, dict[str, int]]:
    meta = json.loads((checkpoint / META_FILE).read_text())
    layout = meta.get("layout", {"tensor": 1, "pipeline": 1, "data": 1})
    return ModelConfig(**meta["model"]), TrainingProgress(**meta["progress"]), layout


MODEL_STATES = "mp_rank_00_model_states.pt"


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The plain ``Bloom`` state dict held by a checkpoint written under tensor-parallel size 1.

    Without pipeline parallelism DeepSpeed keeps the module in ``mp_rank_00_model_states.pt``; with it,
    one ``layer_NN-model_00-model_states.pt`` per pipeline layer (the tied LM head is not saved twice).
    """
    model_config, _, layout = read_meta(checkpoint)
    if layout.get("tensor", 1) != 1:
        raise ValueError(f"{checkpoint} is tensor-parallel ({layout}); exporting it needs a universal checkpoint "
                         "conversion, which bloomtrain does not have yet")
    if layout.get("pipeline", 1) == 1:
        module = torch.load(checkpoint / MODEL_STATES, weights_only=True, map_location="cpu")["module"]
        # megatron-core's parallel layers add an (empty) ``_extra_state`` entry the plain model lacks.
        return {name: tensor for name, tensor in module.items() if not name.endswith("._extra_state")}
    layers = model_config.num_layers
    names = {0: "word_embeddings.", 1: "word_embeddings_layernorm.", layers + 2: "ln_f."}
    names.update({2 + index: f"h.{index}." for index in range(layers)})
    state = {}
    for index, prefix in names.items():
        layer = torch.load(checkpoint / f"layer_{index:02d}-model_00-model_states.pt", weights_only=True,
                           map_location="cpu")
        for name, tensor in layer.items():
            # Drop the stage wrapper's own attribute name (``block.``, ``norm.``) to get the plain model's.
            local = name.split(".", 1)[1] if name.split(".", 1)[0] in ("block", "norm") else name
            state[prefix + local.removeprefix("word_embeddings.")] = tensor
    state["word_embeddings.weight"] = state.pop("word_embeddings.weight")
    return state


def write_model_only_checkpoint(checkpoints_dir: Path, model: torch.nn.Module, model_config: ModelConfig) -> Path:
    """A step-0 checkpoint holding only weights, in the layout (1, 1, 1): what ``convert from-hf`` writes."""
    final = checkpoints_dir / "step_0"
    final.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, final / MODEL_STATES)
    meta = {"progress": dataclasses.asdict(TrainingProgress()), "model": dataclasses.asdict(model_config),
            "layout": {"tensor": 1, "pipeline": 1, "data": 1}}
    (final / META_FILE).write_text(json.dumps(meta, indent=2))
    _write_atomically(checkpoints_dir / LATEST, final.name)
    return final


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray; keep it as a tensor so the state loads without unpickling arrays.
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
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


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(checkpoints_dir: Path, keep: int) -> None:
    steps = sorted(
        (p for p in checkpoints_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
