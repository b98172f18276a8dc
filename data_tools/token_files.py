"""Writing token datasets in Megatron's indexed format (``PREFIX.bin`` + ``PREFIX.idx``), one pair per
language, with megatron-core's ``IndexedDatasetBuilder``: what the trainer reads through
``IndexedDataset``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from bloomtrain.data.tokenizer import TokenEncoder


def token_dtype(vocab_size: int) -> type:
    """uint16 while ids fit (Megatron's choice below 65,500), int32 beyond (BLOOM's 250,680)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_token_files(documents_by_lang: dict[str, list[str]], tokenizer_path: Path, out_dir: Path,
                      eos_id: int | None = None) -> dict[str, int]:
    """One Megatron .bin/.idx pair per language, EOS (the tokenizer's unless given) after each document;
    ``tokenizer_path`` is a sentencepiece model or a Hugging Face tokenizer. Returns each language's
    token count."""
    encoder = TokenEncoder(tokenizer_path)
    eos_id = encoder.eos_id if eos_id is None else eos_id
    dtype = token_dtype(encoder.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for lang, texts in sorted(documents_by_lang.items()):
        builder = IndexedDatasetBuilder(str(out_dir / f"{lang}.bin"), dtype=dtype)
        total = 0
        for ids in encoder.encode(texts):
            ids.append(eos_id)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            total += len(ids)
        builder.finalize(str(out_dir / f"{lang}.idx"))
        counts[lang] = total
    return counts
