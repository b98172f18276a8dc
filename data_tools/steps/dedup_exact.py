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


def dedup_key(text: str) -> int:
    kept = [c for c in text.casefold() if not (c.isspace() or c.isdigit() or unicodedata.category(c)[0] == "P")]
    return xxhash.xxh3_64_intdigest("".join(kept).encode("utf-8"))


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
