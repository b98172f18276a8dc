"""Hugging Face ``BloomForCausalLM`` folders: reading their weights into bloomtrain's model, and writing a
checkpoint's weights as one.

Our parameter names are Hugging Face's without the ``transformer.`` prefix, so the mapping is a
rename plus the vocabulary padding: bloomtrain pads the embedding to a multiple of 128, Hugging Face
stores ``vocab_size`` rows. ``transformers`` itself is not needed to convert.

The tokenizer travels with the weights: ``from_hf_to_checkpoint`` copies the model folder's
``tokenizer.json`` (with its config) into the checkpoint, where it pins the tokenization the run's data
must use; ``to_hf`` writes the checkpoint's tokenizer beside the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bloomtrain.checkpoint.store import TOKENIZER_DIR, read_meta, resolve_checkpoint
from bloomtrain.checkpoint.weights import read_model_weights, write_model_only_checkpoint
from bloomtrain.config import ModelConfig
from bloomtrain.data.tokenizer import TokenEncoder, find_tokenizer, install_tokenizer
from bloomtrain.model import Bloom, build_model

logger = logging.getLogger(__name__)

HF_PREFIX = "transformer."
EMBEDDING = "word_embeddings.weight"


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    def pick(*names: str) -> Any:
        for name in names:
            if name in hf_config:
                return hf_config[name]
        raise KeyError(f"Hugging Face config lacks {names[0]}")

    if hf_config.get("apply_residual_connection_post_layernorm", False):
        raise ValueError("apply_residual_connection_post_layernorm=True is not BLOOM's published architecture")
    return ModelConfig(
        name=hf_config.get("_name_or_path") or "hf-bloom",
        hidden_size=pick("hidden_size", "n_embed"),
        num_layers=pick("n_layer", "num_hidden_layers"),
        num_attention_heads=pick("n_head", "num_attention_heads"),
        vocab_size=pick("vocab_size"),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
        init_std=hf_config.get("initializer_range"),
    )


def hf_config_from_model_config(config: ModelConfig, eos_token_id: int = 2) -> dict[str, Any]:
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "hidden_size": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.resolved_init_std,
        "apply_residual_connection_post_layernorm": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": eos_token_id,
        "pad_token_id": 3,
    }


def is_hugging_face_dir(path: Path) -> bool:
    """A Hugging Face model folder (``config.json``), not a bloomtrain checkpoint (``meta.json``)."""
    return (path / "config.json").is_file() and not (path / "meta.json").exists()


def from_hf(path_or_hf_model: str | Path | torch.nn.Module) -> Bloom:
    """A single-process bloomtrain model holding a Hugging Face BLOOM's weights (fp32)."""
    if isinstance(path_or_hf_model, torch.nn.Module):
        hf_config = path_or_hf_model.config.to_dict()
        hf_state = path_or_hf_model.state_dict()
    else:
        directory = Path(path_or_hf_model)
        hf_config = json.loads((directory / "config.json").read_text())
        hf_state = _read_hf_weights(directory)
    config = model_config_from_hf(hf_config)
    model = build_model(config)
    state = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix(HF_PREFIX)
        if name == "lm_head.weight":
            continue  # tied to the embedding
        state[name] = tensor.float()
    state[EMBEDDING] = _resize_rows(state[EMBEDDING], model.padded_vocab_size)
    model.load_state_dict(state, strict=True)
    return model


def to_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json + model.safetensors, and the run's tokenizer) that
    ``BloomForCausalLM.from_pretrained`` loads.

    A Hugging Face tokenizer is written as ``tokenizer.json`` + ``tokenizer_config.json`` for
    ``AutoTokenizer``; a sentencepiece one as ``tokenizer.model``, for the ``sentencepiece`` library.
    """
    checkpoint = resolve_checkpoint(checkpoint_dir)
    config = read_meta(checkpoint).model
    weights = read_model_weights(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = {HF_PREFIX + name: tensor for name, tensor in weights.items()}
    hf_state[HF_PREFIX + EMBEDDING] = hf_state[HF_PREFIX + EMBEDDING][: config.vocab_size].contiguous()
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos_token_id = 2  # BLOOM's
    if (checkpoint / TOKENIZER_DIR).is_dir():
        install_tokenizer(checkpoint / TOKENIZER_DIR, out)
        eos_token_id = TokenEncoder(out).eos_id
    (out / "config.json").write_text(json.dumps(hf_config_from_model_config(config, eos_token_id), indent=2))
    return out


def from_hf_to_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a weights-only bloomtrain checkpoint (step 0) holding a Hugging Face BLOOM's weights and,
    when the folder has one, its tokenizer."""
    model = from_hf(hf_dir)
    try:
        tokenizer = find_tokenizer(hf_dir)
    except ValueError:
        tokenizer = None
        logger.warning("%s has no tokenizer.json; the checkpoint cannot check that the training data uses the "
                       "model's tokenizer", hf_dir)
    return write_model_only_checkpoint(Path(out_dir), model, model.config, tokenizer)


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", weights_only=True, map_location="cpu")
    raise FileNotFoundError(f"no model.safetensors, safetensors index or pytorch_model.bin in {directory}")


def _resize_rows(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    if embedding.shape[0] >= rows:
        return embedding[:rows]
    padding = embedding.new_zeros(rows - embedding.shape[0], embedding.shape[1])
    return torch.cat([embedding, padding])
