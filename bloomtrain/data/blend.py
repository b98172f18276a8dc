"""The blend file: which token datasets to train on, with what weights, and which tokenizer.

Written by the data pipeline (and by the bundled sample's preparation), read by the trainer through
``data.blend=PATH``. JSON, with paths relative to the file's own directory::

    {"tokenizer": "tokenizer/tokenizer.model",
     "datasets": [{"prefix": "tokens/en", "lang": "en", "tokens": 12345, "weight": 0.12,
                   "valid_prefix": "tokens/valid/en", "valid_tokens": 321}, ...]}

``prefix`` names a Megatron ``PREFIX.bin``/``PREFIX.idx`` pair of training tokens, ``valid_prefix`` (optional)
the language's held-out validation tokens: a document is in exactly one of them. ``tokenizer`` is what
megatron-core's ``MegatronTokenizer`` loads: a sentencepiece model's file, or a Hugging Face tokenizer's folder.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from bloomtrain.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)


@dataclass
class BlendEntry:
    prefix: str
    weight: float
    lang: str = ""
    tokens: int = 0
    valid_prefix: str | None = None
    valid_tokens: int = 0


@dataclass
class Blend:
    tokenizer: str
    datasets: list[BlendEntry]

    @property
    def prefixes(self) -> list[str]:
        return [entry.prefix for entry in self.datasets]

    @property
    def weights(self) -> list[float]:
        return [entry.weight for entry in self.datasets]

    @property
    def validation_sets(self) -> dict[str, str]:
        """Language -> validation prefix, for the languages that have one."""
        return {entry.lang or Path(entry.prefix).name: entry.valid_prefix for entry in self.datasets
                if entry.valid_prefix}


def temperature_weights(token_counts: dict[str, int], alpha: float) -> dict[str, float]:
    """Sampling weights proportional to (share of tokens) ** alpha, as BLOOM's language mixture."""
    total = sum(token_counts.values())
    raw = {name: (count / total) ** alpha for name, count in token_counts.items() if count > 0}
    norm = sum(raw.values())
    return {name: value / norm for name, value in raw.items()}


FINETUNE_KIND = "finetune"
"""``kind`` of a blend file of fine-tuning data (``data_tools.finetune``); pretraining blends have none."""


def write_blend(path: Path, blend: Blend) -> None:
    """Write ``blend`` to ``path``; its tokenizer and prefixes must be relative to ``path``'s folder."""
    payload = {"tokenizer": blend.tokenizer, "datasets": [asdict(entry) for entry in blend.datasets]}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def read_blend(path: str | Path) -> Blend:
    """Read a blend file, resolving its paths, with errors that name ``data.blend``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.blend={path} does not exist; point it at the data pipeline's blend file")
    try:
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and payload.get("kind") == FINETUNE_KIND:
            raise ValueError(f"data.blend={path} holds fine-tuning data (prompt/target pairs from "
                             "data_tools.finetune), not pretraining text; to fine-tune on it set data.kind=finetune "
                             "(or experiment=finetune)")
        root = path.parent
        entries = [
            BlendEntry(**{**entry, "prefix": str((root / entry["prefix"]).resolve()),
                          "valid_prefix": str((root / entry["valid_prefix"]).resolve())
                          if entry.get("valid_prefix") else None})
            for entry in payload["datasets"]
        ]
        blend = Blend(tokenizer=str((root / payload["tokenizer"]).resolve()), datasets=entries)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"data.blend={path} is not a valid blend file: {error!r}") from None
    if not entries:
        raise ValueError(f"data.blend={path} lists no datasets")
    for entry in entries:
        if not isinstance(entry.weight, (int, float)) or not math.isfinite(entry.weight) or entry.weight <= 0:
            raise ValueError(f"data.blend={path}: dataset {entry.lang or entry.prefix} has weight {entry.weight!r}; "
                             "weights must be positive finite numbers (they are normalized to sum to 1)")
    for entry in entries:
        for prefix in (entry.prefix, entry.valid_prefix):
            for suffix in (".bin", ".idx"):
                if prefix is not None and not Path(prefix + suffix).is_file():
                    raise FileNotFoundError(f"data.blend={path}: missing {prefix}{suffix}")
    if not Path(blend.tokenizer).exists():
        raise FileNotFoundError(f"data.blend={path}: missing tokenizer {blend.tokenizer}")
    return blend


def resolve_blend(data: DataConfig, is_main: bool):
    """The run's blend: ``data.blend``, or with none the bundled sample, prepared on first use; with
    ``data.kind=finetune``, the fine-tuning blend (``bloomtrain.data.packing.FinetuneBlend``).

    Preparing the sample trains a tokenizer with the data tools: the one place the library reaches into
    ``data_tools`` (an import-linter contract allows it here alone).
    """
    if data.blend is None and data.kind == "finetune":
        raise ConfigError("data.kind=finetune needs data.blend: the blend.json python -m data_tools.finetune writes")
    if data.blend is None:
        from data_tools.sample import prepare_sample

        if is_main:
            logger.info("no data.blend given: using the bundled multilingual sample (cached in %s)", data.cache_dir)
        return read_blend(prepare_sample(data.cache_dir))
    try:
        if data.kind == "finetune":
            from bloomtrain.data.packing import read_finetune_blend

            return read_finetune_blend(data.blend)
        return read_blend(data.blend)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
