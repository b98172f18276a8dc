"""Prepare the bundled multilingual sample for training: tokenizer, token files and a blend file.

This is the short path the quickstart takes when no ``data.*`` key is given; the full ROOTS-style
pipeline (``python -m data_tools.pipeline``) writes the same outputs from raw web text.

    python -m data_tools.sample [CACHE_DIR]

Output, under ``CACHE_DIR/sample-<hash>/``: ``tokenizer/tokenizer.model`` (sentencepiece BPE with
byte fallback, BLOOM's special-token ids, trained on the training documents), ``tokens/<lang>.bin|.idx``
(Megatron indexed datasets, EOS after each document), ``tokens/valid/<lang>.bin|.idx`` (each language's
held-out validation articles, chosen as the pipeline chooses them) and ``blend.json``. The folder is
built aside and renamed into place, under a file lock, so concurrent ranks or runs never see a
half-written sample.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bloomtrain.data.blend import Blend, BlendEntry, temperature_weights, write_blend
from data_tools.token_files import write_token_files
from data_tools.tokenizer_training import SPECIAL_IDS, train_tokenizer
from data_tools.validation_split import split_key, validation_mask

SAMPLE_CORPUS = Path(__file__).resolve().parent / "samples" / "udhr_sample.jsonl"
SAMPLE_VOCAB_SIZE = 4096  # bloom-tiny's vocab_size
LANGUAGE_ALPHA = 0.3  # BLOOM's temperature for the language mixture
VALID_FRACTION = 0.1  # 3 of each language's 31 articles are held out for validation


def read_documents(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def prepare_sample(cache_dir: str | Path, corpus: Path = SAMPLE_CORPUS,
                   vocab_size: int = SAMPLE_VOCAB_SIZE) -> Path:
    """Return the sample's blend file, preparing it first if this cache has none."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(corpus.read_bytes() + f"{vocab_size}:{LANGUAGE_ALPHA}:{VALID_FRACTION}:v4".encode())
    target = cache_dir / f"sample-{fingerprint.hexdigest()[:12]}"
    blend_path = target / "blend.json"
    with open(cache_dir / ".sample.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if blend_path.exists():
            return blend_path
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        _build(corpus, staging, vocab_size)
        staging.rename(target)
    return blend_path


def _build(corpus: Path, out: Path, vocab_size: int) -> None:
    documents = list(read_documents(corpus))
    keys = np.array([split_key(doc["id"], doc["text"]) for doc in documents], dtype=np.uint64)
    held_out = validation_mask(keys, [doc["lang"] for doc in documents], VALID_FRACTION, 1, len(documents))
    by_split: dict[str, dict[str, list[str]]] = {"train": defaultdict(list), "valid": defaultdict(list)}
    for doc, valid in zip(documents, held_out, strict=True):
        by_split["valid" if valid else "train"][doc["lang"]].append(doc["text"])
    train_texts = [text for texts in by_split["train"].values() for text in texts]
    (out / "tokenizer").mkdir(parents=True)
    tokenizer = train_tokenizer(train_texts, out / "tokenizer" / "tokenizer", vocab_size)
    counts = write_token_files(by_split["train"], tokenizer, out / "tokens", SPECIAL_IDS["eos_id"])
    valid_counts = write_token_files(by_split["valid"], tokenizer, out / "tokens" / "valid", SPECIAL_IDS["eos_id"])
    weights = temperature_weights(counts, LANGUAGE_ALPHA)
    entries = [BlendEntry(prefix=f"tokens/{lang}", weight=weights[lang], lang=lang, tokens=counts[lang],
                          valid_prefix=f"tokens/valid/{lang}" if lang in valid_counts else None,
                          valid_tokens=valid_counts.get(lang, 0))
               for lang in sorted(counts)]
    write_blend(out / "blend.json", Blend(tokenizer="tokenizer/tokenizer.model", datasets=entries))


if __name__ == "__main__":
    print(prepare_sample(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/bloomtrain"))
