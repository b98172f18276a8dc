"""Tokenizer files: a sentencepiece model or a Hugging Face ``tokenizer.json``, used the same way everywhere.

A tokenizer lives in a folder of its own (``OUTPUT/tokenizer/``, ``CHECKPOINT/tokenizer/``) holding

- ``tokenizer.model`` (sentencepiece: what bloomtrain trains), or
- ``tokenizer.json`` with its ``tokenizer_config.json`` / ``special_tokens_map.json`` (Hugging Face
  ``tokenizers``: BLOOM's own byte-level BPE), and
- ``tokenizer_metadata.json``, which tells megatron-core's ``MegatronTokenizer`` which library reads it.

The trainer reads tokenizers through megatron-core. ``TokenEncoder`` uses the library itself: bulk
encoding without special tokens (the data tools append the end-of-document token explicitly) and the
tokenizer's end-of-document token (for exports and installs).
A fingerprint of what defines the tokenization lets a checkpoint refuse data tokenized differently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SENTENCEPIECE_MODEL = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
METADATA = "tokenizer_metadata.json"
# Hugging Face tokenizers without a configured EOS: the names BLOOM and GPT-2 style vocabularies use.
CONVENTIONAL_EOS = ("</s>", "<|endoftext|>", "<eos>")


def find_tokenizer(path: str | Path) -> Path:
    """The defining file of the tokenizer at ``path``: a ``.model`` or ``tokenizer.json`` file, or a
    folder holding one (a Hugging Face model folder works). Raises ValueError naming what is missing."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (HF_TOKENIZER, SENTENCEPIECE_MODEL):  # a folder with both: the fast tokenizer
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path} holds neither a {HF_TOKENIZER} (Hugging Face) nor a {SENTENCEPIECE_MODEL} "
                         "(sentencepiece)")
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist")
    if path.suffix == ".model" or path.name.endswith(".json"):
        return path
    raise ValueError(f"{path} is not a tokenizer: give a sentencepiece .model, a Hugging Face tokenizer.json, "
                     "or a folder holding one")


def library_of(defining_file: Path) -> str:
    return "huggingface" if defining_file.name.endswith(".json") else "sentencepiece"


def megatron_path(path: str | Path) -> Path:
    """What ``MegatronTokenizer.from_pretrained`` takes: a sentencepiece model's file, a Hugging Face
    tokenizer's folder (AutoTokenizer reads the folder)."""
    defining = find_tokenizer(path)
    return defining if library_of(defining) == "sentencepiece" else defining.parent


def install_tokenizer(source: str | Path, target_dir: Path) -> Path:
    """Copy the tokenizer at ``source`` into ``target_dir`` under the standard names, with the
    metadata megatron-core needs; returns the path to hand to ``MegatronTokenizer.from_pretrained``."""
    from megatron.core.tokenizers import MegatronTokenizer

    defining = find_tokenizer(source)
    target_dir.mkdir(parents=True, exist_ok=True)
    if library_of(defining) == "sentencepiece":
        shutil.copyfile(defining, target_dir / SENTENCEPIECE_MODEL)
    else:
        shutil.copyfile(defining, target_dir / HF_TOKENIZER)
        for name in HF_SIDE_FILES:
            if (defining.parent / name).is_file():
                shutil.copyfile(defining.parent / name, target_dir / name)
        if not (target_dir / "tokenizer_config.json").is_file():
            # AutoTokenizer needs a config to pick the fast class and to know the special tokens.
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "eos_token": TokenEncoder(target_dir / HF_TOKENIZER).eos_token}
            (target_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    loadable = megatron_path(target_dir)
    MegatronTokenizer.write_metadata(str(loadable), library_of(defining), overwrite=True)
    return loadable


def tokenizer_fingerprint(path: str | Path) -> dict[str, str]:
    """``{"library", "sha256"}`` of what defines the tokenization: the sentencepiece model's bytes, or
    ``tokenizer.json``'s content without its padding/truncation settings (which re-saving may change)."""
    defining = find_tokenizer(path)
    library = library_of(defining)
    if library == "sentencepiece":
        payload = defining.read_bytes()
    else:
        content = json.loads(defining.read_text(encoding="utf-8"))
        for volatile in ("padding", "truncation", "version"):
            content.pop(volatile, None)
        payload = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {"library": library, "sha256": hashlib.sha256(payload).hexdigest()}


class TokenEncoder:
    """Bulk encoding and decoding with either library, adding no special tokens; knows the EOS token."""

    def __init__(self, path: str | Path) -> None:
        self.path = find_tokenizer(path)
        self.library = library_of(self.path)
        if self.library == "sentencepiece":
            import sentencepiece as spm

            self._spm = spm.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._spm.get_piece_size()
            self.eos_id = self._spm.eos_id()
            self.eos_token = self._spm.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
        else:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.path))
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.eos_token = self._configured_eos() or next(
                (name for name in CONVENTIONAL_EOS if self._hf.token_to_id(name) is not None), None)
            self.eos_id = self._hf.token_to_id(self.eos_token) if self.eos_token else -1
        if self.eos_id is None or self.eos_id < 0:
            raise ValueError(f"cannot tell the end-of-document token of {self.path}: name it as eos_token in "
                             "tokenizer_config.json beside it (sentencepiece: train with an eos id)")

    def _configured_eos(self) -> str | None:
        for name in HF_SIDE_FILES:
            side = self.path.parent / name
            if side.is_file():
                eos = json.loads(side.read_text(encoding="utf-8")).get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if eos:
                    return eos
        return None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.library == "sentencepiece":
            return self._spm.encode(texts)
        return [encoding.ids for encoding in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self.library == "sentencepiece":
            return self._spm.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)
