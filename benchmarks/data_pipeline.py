"""Near-duplicate detection: bloomtrain's MinHash LSH vs ``datasketch``, side by side in one run.

    .venv/bin/python benchmarks/data_pipeline.py [--megabytes 50]

The corpus is generated here (no download): documents of random words from four alphabets (Latin,
Cyrillic, Arabic, Devanagari) and random Chinese characters (shingled by characters), 300-3000 bytes
each, plus planted near-duplicates whose true shingle Jaccard is >= 0.8 (a few words or characters
edited). Both contenders run end to end on the same texts with the same parameters — word 5-gram
shingles (character 5-grams for Chinese), 128 permutations, Jaccard threshold 0.8:

- ours: ``data_tools.minhash`` (NumPy shingling, rensa signatures, banded LSH, verification, union-find);
- datasketch: ``MinHash.update_batch`` over the same shingles as UTF-8 strings, ``MinHashLSH`` insert
  and query.

Each contender first runs once on 200 documents (imports, lookup tables), then is timed on all of
them. Printed: MB/s end to end (shingling included), recall on the planted pairs, and documents removed
that were not planted copies (false removals).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

ALPHABETS = {
    "latin": "abcdefghijklmnopqrstuvwxyz",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "devanagari": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह",
}
NGRAM = 5


def shingles(text: str, language: str) -> list[str]:
    if language == "zh":
        characters = [c for c in text if not c.isspace()]
        return ["".join(characters[i:i + NGRAM]) for i in range(max(len(characters) - NGRAM + 1, 1))]
    words = text.split()
    return [" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))]


def jaccard(first: str, second: str, language: str) -> float:
    a, b = set(shingles(first, language)), set(shingles(second, language))
    return len(a & b) / len(a | b)


def make_corpus(megabytes: float, seed: int = 0) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    rng = random.Random(seed)
    vocabularies = {name: ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(50_000)]
                    for name, letters in ALPHABETS.items()}
    chinese = [chr(c) for c in range(0x4E00, 0x4E00 + 6000)]
    texts, languages = [], []
    target = megabytes * 1e6
    size = 0
    while size < target:
        language = rng.choice([*ALPHABETS, "zh"])
        if language == "zh":
            text = "".join(rng.choice(chinese) for _ in range(rng.randint(100, 1000)))
        else:
            text = " ".join(rng.choice(vocabularies[language]) for _ in range(rng.randint(40, 400)))
        texts.append(text)
        languages.append(language)
        size += len(text.encode())
    pairs = []
    for source in rng.sample(range(len(texts)), len(texts) // 50):
        language = languages[source]
        if language == "zh":
            characters = list(texts[source])
            for position in rng.sample(range(len(characters)), max(1, len(characters) // 200)):
                characters[position] = rng.choice(chinese)
            copy = "".join(characters)
        else:
            words = texts[source].split()
            for position in rng.sample(range(len(words)), max(1, len(words) // 120)):
                words[position] = rng.choice(vocabularies[language])
            copy = " ".join(words)
        if jaccard(texts[source], copy, language) >= 0.8:
            texts.append(copy)
            languages.append(language)
            pairs.append((source, len(texts) - 1))
    return texts, languages, pairs


def run_ours(texts, languages) -> np.ndarray:
    from data_tools.minhash import MinHasher, MinHashParameters, duplicate_clusters

    parameters = MinHashParameters()
    return duplicate_clusters(MinHasher(parameters).signatures(texts, languages), parameters)


def run_datasketch(texts, languages) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    keep = np.arange(len(texts))
    for index, (text, language) in enumerate(zip(texts, languages, strict=True)):
        sketch = MinHash(num_perm=128, seed=1)
        sketch.update_batch([s.encode("utf-8") for s in shingles(text, language)])
        matches = lsh.query(sketch)
        if matches:
            keep[index] = min(matches)
        else:
            lsh.insert(index, sketch)
    return keep


def score(keep: np.ndarray, pairs: list[tuple[int, int]]) -> tuple[float, int]:
    planted = {copy for _, copy in pairs}
    recall = float(np.mean([keep[copy] != copy for _, copy in pairs]))
    false_removals = int(sum(1 for i in range(len(keep)) if keep[i] != i and i not in planted))
    return recall, false_removals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=50)
    args = parser.parse_args()
    texts, languages, pairs = make_corpus(args.megabytes)
    total = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {total:.1f} MB, {len(pairs)} planted near-duplicates (Jaccard >= 0.8)")
    results = {}
    for name, run in (("bloomtrain", run_ours), ("datasketch", run_datasketch)):
        run(texts[:200], languages[:200])  # warm-up: imports and one-time tables, for both alike
        started = time.perf_counter()
        keep = run(texts, languages)
        elapsed = time.perf_counter() - started
        recall, false_removals = score(keep, pairs)
        results[name] = total / elapsed
        print(f"{name:12} {elapsed:8.2f} s {total / elapsed:8.2f} MB/s   recall {recall:.3f}   "
              f"false removals {false_removals}")
    print(f"throughput ratio bloomtrain / datasketch: {results['bloomtrain'] / results['datasketch']:.1f}x")


if __name__ == "__main__":
    main()
