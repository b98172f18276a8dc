"""Near-duplicate detection: shingling, signatures, LSH candidates and clusters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_tools.minhash import MinHasher, MinHashParameters, duplicate_clusters, estimated_jaccard


def _shingle_jaccard(first: str, second: str, n: int = 5) -> float:
    a = set(zip(*[first.split()[k:] for k in range(n)], strict=False))
    b = set(zip(*[second.split()[k:] for k in range(n)], strict=False))
    return len(a & b) / len(a | b)


def _corpus(seed: int = 0, documents: int = 1500, planted: int = 150):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(30000)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(200)) for _ in range(documents)]
    pairs = []
    for source in range(planted):
        words = texts[source].split()
        for position in rng.sample(range(200), rng.randint(1, 4)):
            words[position] = rng.choice(vocabulary)
        copy = " ".join(words)
        if _shingle_jaccard(texts[source], copy) >= 0.8:
            texts.append(copy)
            pairs.append((source, len(texts) - 1))
    return texts, pairs


def test_word_hashes_depend_only_on_the_word():
    hasher = MinHasher()
    tokens, owners = hasher._word_tokens(["alpha beta alpha", "beta \t\n gamma", "", "alpha"])
    assert owners.tolist() == [0, 0, 0, 1, 1, 3]
    assert tokens[0] == tokens[2] == tokens[5] and tokens[1] == tokens[3] and len(set(tokens.tolist())) == 3


def test_signatures_are_batch_independent_and_estimate_jaccard():
    texts, pairs = _corpus(documents=60, planted=20)
    hasher = MinHasher()
    whole = hasher.signatures(texts)
    in_pieces = hasher.signatures(texts, batch_bytes=3000)
    assert np.array_equal(whole, in_pieces)
    for first, second in pairs:
        assert estimated_jaccard(whole[first], whole[second]) == pytest.approx(
            _shingle_jaccard(texts[first], texts[second]), abs=0.15)
    assert estimated_jaccard(whole[0], whole[1]) < 0.05


def test_planted_near_duplicates_found_and_distinct_documents_kept():
    texts, pairs = _corpus()
    keep = duplicate_clusters(MinHasher().signatures(texts), MinHashParameters())
    recall = np.mean([keep[second] == first for first, second in pairs])
    assert recall >= 0.95
    planted = {second for _, second in pairs}
    assert all(keep[i] == i for i in range(len(texts)) if i not in planted)  # no distinct document removed


def test_character_shingles_for_scripts_without_spaces():
    rng = random.Random(1)
    characters = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    original = "".join(rng.choice(characters) for _ in range(400))
    edited = original[:200] + "的" + original[201:]
    other = "".join(rng.choice(characters) for _ in range(400))
    signatures = MinHasher().signatures([original, edited, other], ["zh", "zh", "zh"])
    assert estimated_jaccard(signatures[0], signatures[1]) > 0.9
    assert estimated_jaccard(signatures[0], signatures[2]) < 0.1
    # Without the language, a text without spaces would be one word: no near-duplicate signal.
    as_words = MinHasher().signatures([original, edited])
    assert not np.array_equal(as_words[0], as_words[1])


def test_short_documents_and_bad_parameters():
    signatures = MinHasher().signatures(["one two", "one two", "three"])
    assert np.array_equal(signatures[0], signatures[1]) and not np.array_equal(signatures[0], signatures[2])
    with pytest.raises(ValueError, match="bands x rows"):
        MinHashParameters(num_perm=64, bands=20, rows=5)
