"""Training a sentencepiece tokenizer the way bloomtrain uses it: lossless BPE with byte fallback and
BLOOM's special-token ids, written with the metadata megatron-core's ``MegatronTokenizer`` reads.

Used by the pipeline's tokenizer stage and by the bundled sample's preparation.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizer

# BLOOM's tokenizer numbers its special tokens this way; keeping them lets the same ids mean the same.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


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
