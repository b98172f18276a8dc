"""Prepare the bundled multilingual sample for training: tokenizer, token files and a blend file.

This is the short path the quickstart takes when no ``data.*`` key is given; the full ROOTS-style
pipeline (``python -m data_tools.pipeline``) writes the same outputs from raw web text.

    python -m data_tools.sample [CACHE_DIR]

Output, under ``CACHE_DIR/sample-<hash>/``: ``tokenizer/tokenizer.model`` (sentencepiece BPE with
byte fallback, BLOOM's special-token ids), ``tokens/<lang>.bin|.idx`` (Megatron indexed datasets,
EOS after each document) and ``blend.json``. The folder is built aside and renamed into place, under
a file lock, so concurrent ranks or runs never see a half-written sample.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer

from bloomtrain.data.blend import Blend, BlendEntry, temperature_weights, write_blend
from bloomtrain.data.tokenizer import TokenEncoder

SAMPLE_CORPUS = Path(__file__).resolve().parent / "samples" / "udhr_sample.jsonl"
SAMPLE_VOCAB_SIZE = 4096  # bloom-tiny's vocab_size
LANGUAGE_ALPHA = 0.3  # BLOOM's temperature for the language mixture
# BLOOM's tokenizer numbers its special tokens this way; keeping them lets the same ids mean the same.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def read_documents(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def train_tokenizer(texts: list[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
                    special_tokens: Sequence[str] = ()) -> Path:
    """Train ``<model_prefix>.model``; the same texts give the same bytes wherever it is written.
    ``special_tokens`` get ids right after BLOOM's four and are never split."""
    model = io.BytesIO()  # a model written by path would record that path in its trainer spec
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        # Lossless, like BLOOM's tokenizer: no NFKC, no whitespace folding, so tokens decode to the text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=2,
        minloglevel=2,
        user_defined_symbols=list(special_tokens),
        **SPECIAL_IDS,
    )
    model_path = model_prefix.with_suffix(".model")
    model_path.write_bytes(model.getvalue())
    # megatron-core's MegatronTokenizer finds its library from this file beside the model.
    MegatronTokenizer.write_metadata(str(model_path), "sentencepiece", overwrite=True)
    return model_path


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


def prepare_sample(cache_dir: str | Path, corpus: Path = SAMPLE_CORPUS,
                   vocab_size: int = SAMPLE_VOCAB_SIZE) -> Path:
    """Return the sample's blend file, preparing it first if this cache has none."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(corpus.read_bytes() + f"{vocab_size}:{LANGUAGE_ALPHA}:v2".encode())
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
    documents_by_lang: dict[str, list[str]] = defaultdict(list)
    for doc in read_documents(corpus):
        documents_by_lang[doc["lang"]].append(doc["text"])
    all_texts = [text for texts in documents_by_lang.values() for text in texts]
    (out / "tokenizer").mkdir(parents=True)
    tokenizer = train_tokenizer(all_texts, out / "tokenizer" / "tokenizer", vocab_size)
    counts = write_token_files(documents_by_lang, tokenizer, out / "tokens", SPECIAL_IDS["eos_id"])
    weights = temperature_weights(counts, LANGUAGE_ALPHA)
    entries = [BlendEntry(prefix=f"tokens/{lang}", weight=weights[lang], lang=lang, tokens=counts[lang])
               for lang in sorted(counts)]
    write_blend(out / "blend.json", Blend(tokenizer="tokenizer/tokenizer.model", datasets=entries))


if __name__ == "__main__":
    print(prepare_sample(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/bloomtrain"))
