"""Exact deduplication on a hash of the normalised text (case folded; whitespace, digits and
punctuation removed), so copies differing only in spacing, numbering or punctuation are caught.

The first document with a given hash is kept, the rest dropped as ``exact_duplicate``; "first" is the
order the pipeline reads its inputs in (sorted paths, then line order), so the result is deterministic.
A hash is 8 bytes (xxh3-64): a set of 100 million documents takes about 6 GB of Python ints and set
slots; sharded runs keep one set per language shard.
"""

from __future__ import annotations

import unicodedata

import xxhash

from data_tools.steps.base import Document, DocumentFilter


class _IgnoredCharacters(dict):
    """A ``str.translate`` table deleting whitespace, digits and punctuation, filled as characters are met
    (the Unicode categories are looked up once per distinct character, not once per character)."""

    def __missing__(self, ordinal: int) -> int | None:
        char = chr(ordinal)
        value = None if char.isspace() or char.isdigit() or unicodedata.category(char)[0] == "P" else ordinal
        self[ordinal] = value
        return value


_IGNORED = _IgnoredCharacters()


def dedup_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.casefold().translate(_IGNORED).encode("utf-8"))


class ExactDedup(DocumentFilter):
    name = "exact_dedup"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def reject_reason(self, document: Document) -> str | None:
        key = dedup_key(document.text)
        if key in self.seen:
            return "exact_duplicate"
        self.seen.add(key)
        return None
