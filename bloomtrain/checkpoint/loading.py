"""A whole model to use in one process: a bloomtrain run or checkpoint (any parallel layout, consolidated) or a
Hugging Face BLOOM folder, with its tokenizer, trained length, step and run config (generation and the
lm-evaluation-harness read models this way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bloomtrain.checkpoint.store import TOKENIZER_DIR, CheckpointError, resolve_checkpoint

DEFAULT_HF_MAX_LENGTH = 2048  # lm-eval's own default for a model whose config names no length (BLOOM's)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    max_length: int
    checkpoint: Path
    step: int | None
    config: Any  # the run's BloomTrainConfig; None for a Hugging Face folder


def load_model(path: str | Path) -> LoadedModel:
    """The plain model at ``path`` with its tokenizer, trained length, step and run config."""
    from omegaconf import OmegaConf

    from bloomtrain.checkpoint.hf import from_hf, is_hugging_face_dir
    from bloomtrain.checkpoint.store import read_meta
    from bloomtrain.checkpoint.weights import checkpoint_model
    from bloomtrain.config import BloomTrainConfig
    from bloomtrain.config_loader import to_validated
    from bloomtrain.data.tokenizer import TokenEncoder

    path = Path(path)
    if is_hugging_face_dir(path):
        return LoadedModel(from_hf(path), TokenEncoder(path), DEFAULT_HF_MAX_LENGTH, path, None, None)
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is neither a bloomtrain run or checkpoint (meta.json, or checkpoints/latest) "
                              "nor a Hugging Face BLOOM folder (config.json); give one of those") from None
    if not (checkpoint / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"{checkpoint} holds no tokenizer/ to turn text into tokens")
    config = to_validated(OmegaConf.merge(OmegaConf.structured(BloomTrainConfig),
                                          OmegaConf.load(checkpoint / "config.yaml")))
    return LoadedModel(checkpoint_model(checkpoint), TokenEncoder(checkpoint / TOKENIZER_DIR),
                       config.train.seq_length, checkpoint, read_meta(checkpoint).progress.step, config)
