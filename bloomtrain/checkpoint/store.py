"""The on-disk format of ``RUN_DIR/checkpoints/``: what makes a checkpoint complete, and how it is trusted.

    checkpoints/
      step_200/            DeepSpeed's files (module shards, ZeRO partitions) + meta.json + manifest.json
      step_300/
      latest               the name of the newest complete checkpoint, replaced atomically
      universal/step_200/  DeepSpeed universal form of a checkpoint, made on demand for a new layout

A checkpoint is complete when its ``manifest.json`` exists and every file it lists has the recorded
size and SHA-256. The manifest is written last, inside the staging directory, before the rename that
publishes the checkpoint; a directory without one is a save that never finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bloomtrain.config import ModelConfig

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
TOKENIZER_DIR = "tokenizer"  # a copy of the tokenizer the run's data was tokenized with
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why in one line."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (on any rank); the previous checkpoint is untouched."""


@dataclass
class TrainingProgress:
    """Where training stands: what a resume needs besides the tensors."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    wandb_run_id: str | None = None
    tokens_by_language: dict[str, int] = dataclasses.field(default_factory=dict)
    best_valid_loss: float | None = None  # the best eval.metric so far (the validation loss by default)
    best_step: int | None = None  # the step it was reached at (checkpoints/best, when the run keeps one)
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0  # steps skipped for a NaN/Inf loss or gradient (bloomtrain/health.py)
    skipped_samples: int = 0  # samples passed over after loss spikes: training reads from consumed + skipped
    loss_spikes: int = 0  # rollbacks so far


@dataclass(frozen=True)
class CheckpointMeta:
    progress: TrainingProgress
    model: ModelConfig
    layout: dict[str, Any]
    padded_vocab_size: int | None
    weights_only: bool  # written by ``convert from-hf``: weights, no optimizer state
    tokenizer: dict[str, str] | None  # fingerprint of the tokenizer its data was tokenized with


def write_meta(directory: Path, progress: TrainingProgress, model: ModelConfig, layout: dict[str, Any],
               padded_vocab_size: int, extra: dict[str, Any] | None = None, weights_only: bool = False) -> None:
    meta = {"progress": dataclasses.asdict(progress), "model": dataclasses.asdict(model), "layout": layout,
            "padded_vocab_size": padded_vocab_size, "weights_only": weights_only, **(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(checkpoint: Path) -> CheckpointMeta:
    meta = json.loads((checkpoint / META_FILE).read_text())
    known = {field.name for field in dataclasses.fields(TrainingProgress)}
    progress = TrainingProgress(**{k: v for k, v in meta["progress"].items() if k in known})
    layout = {"tensor": 1, "pipeline": 1, "data": 1, **meta.get("layout", {})}
    return CheckpointMeta(progress, ModelConfig(**meta["model"]), layout, meta.get("padded_vocab_size"),
                          meta.get("weights_only", False), meta.get("tokenizer"))


# ---------------------------------------------------------------------------------------------- manifest

def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def list_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and
                  p.name != MANIFEST_FILE)


def write_manifest(directory: Path, digests: dict[str, str]) -> None:
    """Record every file's size and digest; fsync it, the files, and the directory."""
    entries = {}
    for name in sorted(digests):
        path = directory / name
        _fsync(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": digests[name]}
    manifest = directory / MANIFEST_FILE
    manifest.write_text(json.dumps({"files": entries}, indent=1))
    _fsync(manifest)
    _fsync(directory)


def manifest_problems(directory: Path, names: list[str] | None = None, checksums: bool = True) -> list[str]:
    """What is wrong with ``directory`` against its manifest (empty when sound).

    ``names`` restricts the check to some of the manifest's files, so ranks can share the hashing.
    """
    manifest = directory / MANIFEST_FILE
    if not manifest.exists():
        return [f"no {MANIFEST_FILE} (the save did not finish)"]
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return [f"{MANIFEST_FILE} is unreadable"]
    problems = []
    for name in entries if names is None else names:
        path, want = directory / name, entries[name]
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif checksums and file_digest(path) != want["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def manifest_files(directory: Path) -> list[str]:
    try:
        return sorted(json.loads((directory / MANIFEST_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return []


# ----------------------------------------------------------------------------------------- the directory

def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def published_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """``step_N`` directories, newest first (whether or not they are complete)."""
    found = [p for p in checkpoints_dir.glob("step_*") if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of, reverse=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it exists and has its meta file (no checksum check)."""
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


def publish(staging: Path, final: Path) -> None:
    """Rename a finished staging directory into place, then point ``latest`` at it."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync(final.parent)
    write_atomically(final.parent / LATEST, final.name)


BEST = "best"


def keep_as_best(checkpoint: Path) -> Path:
    """``checkpoints/best``: a copy of ``checkpoint`` made of hard links (no space while both exist; it
    outlives the pruning of the original), a checkpoint like any other (export, resume, evaluate)."""
    best, staging, old = (checkpoint.parent / name for name in (BEST, f"{BEST}.tmp", f"{BEST}.old"))
    shutil.rmtree(staging, ignore_errors=True)

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links
            shutil.copy2(source, target)

    shutil.copytree(checkpoint, staging, copy_function=link)
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(staging, best)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(best.parent)
    return best


def prune(checkpoints_dir: Path, keep: int, keep_every: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, sparing steps that are multiples of ``keep_every``."""
    if not keep:
        return []
    removed = []
    for old in published_checkpoints(checkpoints_dir)[keep:]:
        if keep_every and step_of(old) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(checkpoints_dir / "universal" / old.name, ignore_errors=True)
        removed.append(old)
    return removed


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    _fsync(staging)
    os.replace(staging, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
