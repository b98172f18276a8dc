"""Near-duplicate detection with MinHash LSH, vectorised with NumPy end to end (shingling included).

1. Shingles, for a whole batch of documents at once. Words are the runs of bytes between ASCII
   whitespace in the UTF-8 text; each word gets a 64-bit polynomial hash without a Python loop
   (a prefix sum over all bytes, shifted back to each word's start). A shingle is ``ngram``
   consecutive word hashes of one document combined with fixed odd multipliers. Scripts written
   without spaces (zh, ja, th, ...) use character n-grams of code points instead.
2. Signatures: ``rensa`` (a compiled MinHash) takes the flat shingle hashes and document offsets and
   returns ``num_perm`` minimums per document, uint32: 4 x num_perm bytes per document.
3. Candidates. The signature is cut into ``bands`` bands of ``rows`` rows; documents sharing a band's
   values are candidates. With 25 x 5 a pair at Jaccard 0.8 becomes a candidate with probability
   0.99995; at 0.5 with 0.55 — so:
4. Verification. A candidate pair counts only if its signatures agree on at least
   ``verify_threshold`` (default: threshold - 0.1) of the functions: with 128 functions the estimate's
   standard deviation near 0.8 is 0.035, so true near-duplicates at the threshold pass (~99.7%) while
   pairs around 0.5 never do.
5. Clusters. Union-find over verified pairs; each cluster keeps the document that came first in
   input order, so the result does not depend on how the work was split.

Memory: signatures take 4 x num_perm bytes per document (512 MB per million at 128) and band keys 8
bytes per band (200 MB per million at 25 bands); the pipeline keeps both on disk (the clean stage
writes them per shard, band keys band-major) and clusters one band at a time, reading signatures only
for candidate pairs, so the dedup stage holds a few dozen bytes per document (docs/data_pipeline.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from data_tools.text import NO_SPACE_LANGUAGES, POLYNOMIAL_HASH_BASE

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
ASCII_WHITESPACE = np.zeros(256, dtype=bool)
ASCII_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
WORD_BASE = POLYNOMIAL_HASH_BASE
WORD_BASE_INVERSE = np.uint64(pow(int(WORD_BASE), -1, 2**64))


@dataclass(frozen=True)
class MinHashParameters:
    num_perm: int = 128
    bands: int = 25
    rows: int = 5
    ngram: int = 5
    char_ngram: int = 5
    threshold: float = 0.8
    verify_threshold: float | None = None  # default: threshold - 0.1
    seed: int = 1

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}")

    @property
    def verify(self) -> float:
        return self.threshold - 0.1 if self.verify_threshold is None else self.verify_threshold


class MinHasher:
    """Signatures for batches of texts: ``signatures(texts, languages)`` -> uint32 [docs, num_perm]."""

    def __init__(self, parameters: MinHashParameters = MinHashParameters()) -> None:
        self.parameters = parameters
        rng = np.random.default_rng(parameters.seed)

        def odd(size: int) -> np.ndarray:
            return rng.integers(0, 2**63, size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

        self.byte_table = odd(256)
        self.ngram_weights = odd(max(parameters.ngram, parameters.char_ngram))
        self._power = self._inverse = np.zeros(0, dtype=np.uint64)

    # ------------------------------------------------------------------------------------------ tokens

    def _powers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """P**i and P**-i mod 2**64 for i < size (P odd, hence invertible), grown on demand."""
        if self._power.size < size:
            capacity = max(size, 2 * self._power.size, 1 << 20)
            one = np.ones(1, dtype=np.uint64)
            self._power = np.concatenate((one, np.cumprod(np.full(capacity - 1, WORD_BASE, dtype=np.uint64))))
            self._inverse = np.concatenate((one, np.cumprod(np.full(capacity - 1, WORD_BASE_INVERSE,
                                                                    dtype=np.uint64))))
        return self._power[:size], self._inverse[:size]

    def _word_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Word hashes of all texts (one pass over their joined bytes) and the document of each word.

        A word's hash is its polynomial hash sum(T[byte_j] * P**j), j counted from the word's start:
        computed for all bytes at once as a prefix sum with global positions, then shifted back to the
        word's start by multiplying with P**-start (all arithmetic mod 2**64).
        """
        encoded = [text.encode("utf-8") for text in texts]
        data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
        is_word = ~ASCII_WHITESPACE[data]
        following = np.concatenate((is_word[1:], [False]))
        preceding = np.concatenate(([False], is_word[:-1]))
        starts = np.flatnonzero(is_word & ~preceding)
        ends = np.flatnonzero(is_word & ~following)
        if starts.size == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        power, inverse = self._powers(data.size)
        prefix = np.cumsum(np.where(is_word, self.byte_table[data], np.uint64(0)) * power)
        before = np.where(starts > 0, prefix[starts - 1], np.uint64(0))
        hashes = (prefix[ends] - before) * inverse[starts]
        document_ends = np.cumsum([len(b) + 1 for b in encoded])  # +1: the separator
        return hashes, np.searchsorted(document_ends, starts, side="right")

    def _char_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Code-point hashes of all texts (spacing and controls dropped) and the document of each."""
        points = [np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) for text in texts]
        documents = np.repeat(np.arange(len(texts)), [p.size for p in points])
        flat = np.concatenate(points).astype(np.uint64) if points else np.zeros(0, dtype=np.uint64)
        keep = flat > 32
        mixed = (flat[keep] + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        return mixed ^ (mixed >> np.uint64(31)), documents[keep]

    def _shingles(self, tokens: np.ndarray, documents: np.ndarray, count: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n-gram shingles within each document; a document shorter than n is one shingle of all it has."""
        combined = np.zeros(max(tokens.size - n + 1, 0), dtype=np.uint64)
        for offset in range(n):
            combined += tokens[offset:offset + combined.size] * self.ngram_weights[offset]
        inside = documents[: combined.size] == documents[n - 1:n - 1 + combined.size]
        shingles, owners = combined[inside], documents[: combined.size][inside]
        lengths = np.bincount(documents, minlength=count)
        short = np.flatnonzero(lengths < n)
        if short.size:
            # Position-weighted sum of every token of each short document (zero tokens: a constant).
            order_in_doc = np.arange(tokens.size) - np.searchsorted(documents, documents, side="left")
            weighted = tokens * self.ngram_weights[np.minimum(order_in_doc, n - 1)]
            sums = np.zeros(count, dtype=np.uint64)
            np.add.at(sums, documents, weighted)
            shingles = np.concatenate([shingles, sums[short]])
            owners = np.concatenate([owners, short])
        order = np.argsort(owners, kind="stable")
        return shingles[order], owners[order]

    # ---------------------------------------------------------------------------------------- signatures

    def signatures(self, texts: Sequence[str], languages: Sequence[str | None] | None = None,
                   batch_bytes: int = 4 << 20) -> np.ndarray:
        """Signatures of ``texts``, worked through in batches of about ``batch_bytes`` (bounded memory)."""
        languages = list(languages or [None] * len(texts))
        result = np.empty((len(texts), self.parameters.num_perm), dtype=np.uint32)
        start = 0
        while start < len(texts):
            stop, size = start, 0
            while stop < len(texts) and (stop == start or size + len(texts[stop]) <= batch_bytes):
                size += len(texts[stop])
                stop += 1
            result[start:stop] = self._batch_signatures(texts[start:stop], languages[start:stop])
            start = stop
        return result

    def _batch_signatures(self, texts: Sequence[str], languages: Sequence[str | None]) -> np.ndarray:
        import rensa

        result = np.empty((len(texts), self.parameters.num_perm), dtype=np.uint32)
        by_characters = np.array([language in NO_SPACE_LANGUAGES for language in languages], dtype=bool)
        for use_characters in (False, True):
            members = np.flatnonzero(by_characters == use_characters)
            if members.size == 0:
                continue
            group = [texts[i] for i in members]
            if use_characters:
                tokens, documents = self._char_tokens(group)
                n = self.parameters.char_ngram
            else:
                tokens, documents = self._word_tokens(group)
                n = self.parameters.ngram
            shingles, owners = self._shingles(tokens, documents, len(group), n)
            offsets = np.searchsorted(owners, np.arange(len(group) + 1)).astype(np.uint64)
            # rensa (compiled) turns the shingle hashes into num_perm minimums per document.
            matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, offsets,
                                                                         self.parameters.num_perm,
                                                                         self.parameters.seed)
            result[members] = np.array(matrix.to_rows(), dtype=np.uint32)
        return result


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.mean(first == second))


def band_keys(signatures: np.ndarray, parameters: MinHashParameters) -> np.ndarray:
    """One 64-bit key per (document, band): [docs, bands]."""
    used = signatures[:, : parameters.bands * parameters.rows].astype(np.uint64)
    bands = used.reshape(len(signatures), parameters.bands, parameters.rows)
    weights = (np.arange(1, parameters.rows + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    keys = (bands * weights).sum(axis=2, dtype=np.uint64)
    return keys ^ (np.arange(parameters.bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))


def band_pairs(keys: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], parameters: MinHashParameters
               ) -> np.ndarray:
    """Pairs (earlier, later) that share this band's key and whose signatures (``rows(indices)``) agree
    on ``verify`` of the functions.

    Within a bucket each document is compared with the bucket's first document; one that does not
    match it is compared with the others of the bucket (rare: it takes a colliding band of two families).
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    del sorted_keys
    repeated = np.flatnonzero(~starts)
    if repeated.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    anchors, others = order[run_start[repeated]], order[repeated]
    agree = (rows(anchors) == rows(others)).mean(axis=1) >= parameters.verify
    found = [np.stack([np.minimum(anchors, others), np.maximum(anchors, others)], axis=1)[agree]]
    for position in repeated[~agree]:
        other = order[position]
        earlier = order[run_start[position]:position]
        matches = (rows(earlier) == rows(np.array([other]))).mean(axis=1) >= parameters.verify
        if matches.any():
            first = int(earlier[np.argmax(matches)])
            found.append(np.array([[min(first, other), max(first, other)]]))
    return np.concatenate(found)


def cluster_roots(bands: Iterable[np.ndarray], rows: Callable[[np.ndarray], np.ndarray], size: int,
                  parameters: MinHashParameters) -> np.ndarray:
    """For each of ``size`` documents (in input order), the index of the document its cluster keeps: the
    earliest. ``bands`` yields each band's keys (one per document), ``rows(indices)`` returns those
    documents' signatures; one band is held at a time, so memory is a few dozen bytes per document
    whatever the number of bands (the pipeline reads both from the clean stage's files)."""
    parent = np.arange(size, dtype=np.int64)
    for keys in bands:
        for first, second in band_pairs(keys, rows, parameters):
            a, b = _root(parent, int(first)), _root(parent, int(second))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smaller index (earlier document) stays the root
    while True:  # every document straight to its root
        grandparent = parent[parent]
        if np.array_equal(grandparent, parent):
            return parent
        parent = grandparent


def _root(parent: np.ndarray, item: int) -> int:
    root = item
    while parent[root] != root:
        root = parent[root]
    while parent[item] != root:
        parent[item], item = root, parent[item]
    return root


def duplicate_clusters(signatures: np.ndarray, parameters: MinHashParameters) -> np.ndarray:
    """:func:`cluster_roots` for signatures held in memory ([documents, num_perm])."""
    keys = band_keys(signatures, parameters)
    return cluster_roots((keys[:, band] for band in range(parameters.bands)), lambda indices: signatures[indices],
                         len(signatures), parameters)
