"""Training a sentencepiece tokenizer the way bloomtrain uses it: lossless BPE with byte fallback and
BLOOM's special-token ids, written with the metadata megatron-core's ``MegatronTokenizer`` reads.

Two things make it work on any corpus rather than on the one it was tried on:
- **Character coverage is chosen, not fixed.** sentencepiece gives every character it must cover a
  vocabulary entry and refuses to train when they do not fit ("Vocabulary size is smaller than
  required_chars"), which a corpus with Chinese or Japanese does at small vocabularies. We count the
  sample's characters and keep the most frequent, as many as ``DEFAULT_COVERAGE`` of the occurrences
  needs but filling at most ``CHARACTER_SHARE`` of the free vocabulary; the rarer ones are left out of
  the training text and become byte pieces (byte fallback), so nothing is unknown — BLOOM's tokenizer
  has no unknown token either.
- **Long documents are cut into training sentences** of at most ``MAX_SENTENCE_BYTES`` (at line ends
  where possible): sentencepiece silently skips longer sentences, which on web text is most of them.

Used by the pipeline's tokenizer stage and by the bundled sample's preparation.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path

import sentencepiece as spm

from data_tools.errors import DataError

# BLOOM's tokenizer numbers its special tokens this way; keeping them lets the same ids mean the same.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
BYTE_PIECES = 256
DEFAULT_COVERAGE = 0.9995
CHARACTER_SHARE = 0.5
"""At most this share of the vocabulary left after special and byte pieces goes to single characters;
the rest is merges, without which BPE is no better than characters."""
MAX_SENTENCE_BYTES = 4000  # sentencepiece's max_sentence_length is 4192 bytes
WHITESPACE_PIECE = "\u2581"  # sentencepiece counts spaces as this character
TRAINING_REPORT = "training.json"


class TokenizerTrainingError(DataError):
    """Training cannot work with these settings; the message names the key to change."""


def minimum_vocab_size(special_tokens: Sequence[str] = ()) -> int:
    """The smallest vocabulary that can hold the special and byte pieces and some characters and merges."""
    return len(SPECIAL_IDS) + len(special_tokens) + BYTE_PIECES + 256


@dataclass
class CharacterCoverage:
    """What the coverage choice kept: reported beside the model as ``training.json``."""

    character_coverage: float
    distinct_characters: int
    characters_as_pieces: int
    """Characters with a vocabulary entry of their own; the others are spelled with byte pieces."""
    byte_fallback_share: float
    """Share of the sample's characters (by occurrence) that become bytes."""


def choose_characters(counts: Counter, room: int,
                      coverage: float = DEFAULT_COVERAGE) -> tuple[set[str], CharacterCoverage]:
    """The characters that get pieces of their own: the most frequent ones, as many as ``coverage`` of the
    occurrences needs (sentencepiece's rule) but at most ``room``."""
    ranked = [character for character, _ in counts.most_common()]
    frequencies = [counts[character] for character in ranked]
    total = sum(frequencies)
    if not total:
        raise TokenizerTrainingError("the tokenizer's training sample is empty")
    covered = list(accumulate(frequencies, initial=0))  # covered[k]: occurrences of the k most frequent
    needed = next((k for k, share in enumerate(covered) if share / total >= coverage), len(ranked))
    pieces = min(needed, room)
    return set(ranked[:pieces]), CharacterCoverage(round(covered[pieces] / total, 7), len(ranked), pieces,
                                                   round(1 - covered[pieces] / total, 7))


def training_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """The texts cut into pieces of at most ``max_bytes`` UTF-8 bytes, at line ends where possible."""
    for text in texts:
        if len(text.encode("utf-8")) <= max_bytes:
            yield text
            continue
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            for part in _cut(line, max_bytes):
                length = len(part.encode("utf-8"))
                if size + length > max_bytes and piece:
                    yield "".join(piece)
                    piece, size = [], 0
                piece.append(part)
                size += length
        if piece:
            yield "".join(piece)


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    while len(line.encode("utf-8")) > max_bytes:
        head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        yield head
        line = line[len(head):]
    if line:
        yield line


_REQUIRED_CHARS = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def train_tokenizer(texts: list[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
                    special_tokens: Sequence[str] = (), character_coverage: float | None = None) -> Path:
    """Train ``<model_prefix>.model`` and write ``training.json`` beside it; the same texts give the same
    bytes wherever it is written. ``special_tokens`` get ids right after BLOOM's four and are never
    split. ``character_coverage`` None chooses it (see the module docstring)."""
    from megatron.core.tokenizers import MegatronTokenizer

    if vocab_size < minimum_vocab_size(special_tokens):
        raise TokenizerTrainingError(
            f"tokenizer.vocab_size={vocab_size} cannot hold the {len(SPECIAL_IDS) + len(special_tokens)} special "
            f"and {BYTE_PIECES} byte pieces and leave room for characters; use at least "
            f"{minimum_vocab_size(special_tokens)}")
    sentences = list(training_sentences(texts))
    counts = Counter()
    for sentence in sentences:
        counts.update(sentence.replace(" ", WHITESPACE_PIECE))
    room = int((vocab_size - len(SPECIAL_IDS) - len(special_tokens) - BYTE_PIECES) * CHARACTER_SHARE)
    if character_coverage is not None:
        room = len(counts)  # the user's coverage, however many characters it takes
    kept, chosen = choose_characters(counts, room, character_coverage or DEFAULT_COVERAGE)
    # Characters left out are removed from the training text (they encode as bytes all the same), so
    # sentencepiece's own coverage rule, which it will not take below 0.98, cannot ask for more pieces.
    rare = {ord(character): None for character in counts if character not in kept and character != WHITESPACE_PIECE}
    sample = [sentence.translate(rare) for sentence in sentences] if rare else sentences
    try:
        model = _train(sample, vocab_size, model_type, special_tokens, character_coverage or DEFAULT_COVERAGE)
    except RuntimeError as error:
        too_high = _TOO_HIGH.search(str(error))
        if too_high:
            raise TokenizerTrainingError(
                f"tokenizer.vocab_size={vocab_size} is more than the training sample can fill (sentencepiece: "
                f"Vocabulary size too high, at most {int(too_high.group(2)):,}); lower tokenizer.vocab_size "
                "or give more text") from None
        if _REQUIRED_CHARS.search(str(error)):
            raise TokenizerTrainingError(
                f"tokenizer.character_coverage={character_coverage} needs {chosen.characters_as_pieces:,} "
                f"character pieces, more than tokenizer.vocab_size={vocab_size} holds; set "
                "tokenizer.character_coverage=null (chosen to fit) or raise tokenizer.vocab_size") from None
        raise TokenizerTrainingError(f"sentencepiece could not train: {_first_line(error)}") from None
    model_path = model_prefix.with_suffix(".model")
    model_path.write_bytes(model)
    report = {**asdict(chosen), "vocab_size": vocab_size, "model_type": model_type,
              "sentences": len(sentences), "sample_bytes": sum(len(s.encode("utf-8")) for s in sentences)}
    model_path.with_name(TRAINING_REPORT).write_text(json.dumps(report, indent=1))
    # megatron-core's MegatronTokenizer finds its library from this file beside the model.
    MegatronTokenizer.write_metadata(str(model_path), "sentencepiece", overwrite=True)
    return model_path


def _train(sentences: list[str], vocab_size: int, model_type: str, special_tokens: Sequence[str],
           character_coverage: float) -> bytes:
    model = io.BytesIO()  # a model written by path would record that path in its trainer spec
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
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
    return model.getvalue()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
