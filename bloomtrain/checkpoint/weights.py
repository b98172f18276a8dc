"""A checkpoint's model weights as one plain ``Bloom`` state dict, whatever layout wrote it.

DeepSpeed stores the module per tensor rank: ``mp_rank_TT_model_states.pt`` without pipeline
parallelism; with it, one ``layer_NN-model_TT-model_states.pt`` per saved layer of the layer table
(:func:`bloomtrain.parallel.names.pipeline_layers`; the tied LM head is not saved twice).
Shards are joined along the dimension :func:`bloomtrain.parallel.names.shard_dim` gives; replicated
parameters are taken from tensor rank 0 (they are bitwise equal across ranks).
Reading needs no process group, so ``convert to-hf`` runs on a laptop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bloomtrain.checkpoint.store import (
    LATEST,
    TOKENIZER_DIR,
    TrainingProgress,
    file_digest,
    list_files,
    read_meta,
    write_atomically,
    write_manifest,
    write_meta,
)
from bloomtrain.config import ModelConfig
from bloomtrain.data.tokenizer import install_tokenizer, tokenizer_fingerprint
from bloomtrain.model import Bloom, build_model
from bloomtrain.parallel.names import pipeline_layers, plain_name_of_layer, shard_dim

MODEL_STATES = "mp_rank_{tensor:02d}_model_states.pt"
LAYER_STATES = "layer_{index:02d}-model_{tensor:02d}-model_states.pt"


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def tensor_rank_weights(checkpoint: Path, tensor_rank: int) -> dict[str, torch.Tensor]:
    """Tensor rank ``tensor_rank``'s shard of every parameter, under plain names."""
    meta = read_meta(checkpoint)
    if meta.layout["pipeline"] == 1:
        return dict(_load(checkpoint / MODEL_STATES.format(tensor=tensor_rank))["module"])
    layers = meta.model.num_layers
    state = {}
    for index, layer in enumerate(pipeline_layers(layers)):
        if not layer.saved:
            continue
        for key, tensor in _load(checkpoint / LAYER_STATES.format(index=index, tensor=tensor_rank)).items():
            state[plain_name_of_layer(index, key, layers)] = tensor
    return state


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (padded-vocabulary) plain ``Bloom`` state dict held by ``checkpoint``."""
    tensor_size = read_meta(checkpoint).layout["tensor"]
    shards = [tensor_rank_weights(checkpoint, rank) for rank in range(tensor_size)]
    merged = {}
    for name, first in shards[0].items():
        dim = shard_dim(name)
        merged[name] = first if dim is None or tensor_size == 1 else torch.cat([s[name] for s in shards], dim=dim)
    return merged


def write_model_only_checkpoint(checkpoints_dir: Path, model: torch.nn.Module, model_config: ModelConfig,
                                tokenizer: Path | None = None) -> Path:
    """A step-0 checkpoint holding only weights, layout (1, 1, 1), and the model's tokenizer if given:
    what ``convert from-hf`` writes.

    A run started from it (``checkpoint.resume=PATH``) loads the weights into any layout and begins
    with a fresh optimizer and schedule.
    """
    final = checkpoints_dir / "step_0"
    final.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"module": state}, final / MODEL_STATES.format(tensor=0))
    extra = {}
    if tokenizer is not None:
        install_tokenizer(tokenizer, final / TOKENIZER_DIR)
        extra["tokenizer"] = tokenizer_fingerprint(final / TOKENIZER_DIR)
    write_meta(final, TrainingProgress(), model_config, {"tensor": 1, "pipeline": 1, "data": 1},
               state["word_embeddings.weight"].shape[0], extra=extra, weights_only=True)
    write_manifest(final, {name: file_digest(final / name) for name in list_files(final)})
    write_atomically(checkpoints_dir / LATEST, final.name)
    return final


def checkpoint_model(checkpoint: Path) -> Bloom:
    """The single-process model holding a bloomtrain checkpoint's weights (any layout, padded vocabulary kept)."""
    meta = read_meta(checkpoint)
    model = build_model(meta.model, padded_vocab_size=meta.padded_vocab_size)
    model.load_state_dict(read_model_weights(checkpoint))
    return model
