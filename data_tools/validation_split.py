"""Holding out a fixed validation set per language, deterministically.

Each document gets a key from its id and text (:func:`split_key`), so the choice does not depend on
how the input was sharded or how many workers ran. Per language, the documents with the smallest keys
are held out: ``valid_fraction`` of them, at least ``min_documents`` and at most ``max_documents``, and
never the language's last document (a language keeps at least one training document). The split is
made after deduplication, so a document and its (near-)duplicate can never end up on both sides: one
of them was already removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash


def split_key(document_id: str, text: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{document_id}\x00{text}".encode())


def validation_mask(keys: np.ndarray, languages: Sequence[str] | np.ndarray, valid_fraction: float,
                    min_documents: int, max_documents: int) -> np.ndarray:
    """For each document (in input order), whether it is held out for validation. ``languages`` may be
    names or integer codes (the pipeline passes codes: 4 bytes a document)."""
    languages = np.asarray(languages)
    valid = np.zeros(len(languages), dtype=bool)
    for language in np.unique(languages):
        positions = np.flatnonzero(languages == language)
        wanted = min(max(round(valid_fraction * len(positions)), min_documents), max_documents, len(positions) - 1)
        if wanted <= 0:
            continue
        order = np.argsort(keys[positions], kind="stable")  # ties: the earlier document
        valid[positions[order[:wanted]]] = True
    return valid
