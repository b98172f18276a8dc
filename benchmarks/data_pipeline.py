"""The data pipeline, measured side by side in one run: near dedup vs ``datasketch``, tokenisation with
two workers vs a plain sentencepiece loop, the whole pipeline's throughput and peak memory, and per-stage
throughput, memory and a clean-stage profile on the bundled real corpus (Debian translation catalogs).

    .venv/bin/python benchmarks/data_pipeline.py [--megabytes 50] [--prose-megabytes 20]
                                                 [--parts near_dedup,tokenize,pipeline,real_corpus]

Near dedup (``near_dedup``)
---------------------------

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

Whole pipeline (``pipeline``) and tokenisation (``tokenize``)
-------------------------------------------------------------
A prose corpus built from the bundled UDHR sample (16 languages; each document 3-8 random articles of
one language, so language id and quality filters see real text) in 8 JSON Lines files. The pipeline
runs as a user runs it (``python -m data_tools.pipeline ... executor.workers=2``) while the memory of
its whole process tree is sampled every 50 ms: printed are MB/s of raw input and the peak of the
tree's summed PSS (and the largest single RSS). Then, on that run's cleaned text and tokenizer, the
tokenize + merge stages are rerun with two workers and compared with a plain loop in one process
(``SentencePieceProcessor.encode`` per document into megatron-core's ``IndexedDatasetBuilder``, one
file pair per language); the token files of both must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def near_dedup(megabytes: float) -> None:
    texts, languages, pairs = make_corpus(megabytes)
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


# ------------------------------------------------------------------------------- prose corpus, pipeline

def make_prose_corpus(folder: Path, megabytes: float, files: int = 8, seed: int = 0) -> list[Path]:
    from data_tools.sample import SAMPLE_CORPUS

    rng = random.Random(seed)
    articles: dict[str, list[str]] = {}
    for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines():
        document = json.loads(line)
        articles.setdefault(document["lang"], []).append(document["text"])
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(files)]
    size, index = 0, 0
    while size < megabytes * 1e6:
        language = rng.choice(sorted(articles))
        text = "\n\n".join(rng.sample(articles[language], rng.randint(3, 8)))
        handles[index % files].write(json.dumps({"id": f"doc-{index}", "text": text}, ensure_ascii=False) + "\n")
        size += len(text.encode("utf-8"))
        index += 1
    for handle in handles:
        handle.close()
    return sorted(folder.glob("part-*.jsonl"))


def run_with_peak_memory(command: list[str]) -> tuple[float, float, float]:
    """Run ``command``; returns (seconds, peak PSS summed over its process tree, peak RSS of its largest
    process), in MB. PSS splits pages shared by forked workers among them, so the sum is what the tree
    really occupies."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak_tree, peak_single = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            memory = [p.memory_full_info() for p in tree]
            peak_tree = max(peak_tree, sum(m.pss for m in memory))
            peak_single = max(peak_single, *(m.rss for m in memory))
        except psutil.Error:
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"pipeline failed:\n{process.stderr.read()[-3000:]}")
    return elapsed, peak_tree / 1e6, peak_single / 1e6


def pipeline_and_tokenize(megabytes: float, parts: set[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bloomtrain-data-bench-"))
    inputs = make_prose_corpus(root / "raw", megabytes)
    raw_mb = sum(p.stat().st_size for p in inputs) / 1e6
    out = root / "out"
    overrides = [f"input.paths=[{root / 'raw'}/part-*.jsonl]", f"output.dir={out}", "executor.workers=2",
                 "tokenizer.vocab_size=8000"]
    elapsed, peak_tree, peak_single = run_with_peak_memory([sys.executable, "-m", "data_tools.pipeline", *overrides])
    report = json.loads((out / "report" / "report.json").read_text())
    print(f"prose corpus: {len(inputs)} files, {raw_mb:.1f} MB")
    if "pipeline" in parts:
        print(f"whole pipeline, 2 workers: {elapsed:.1f} s, {raw_mb / elapsed:.2f} MB/s of raw input, "
              f"peak memory {peak_tree:.0f} MB (PSS summed over the 3 processes; largest RSS {peak_single:.0f} MB)")
        steps = report["steps"]
        documents_read = sum(c["documents"] for c in steps[0]["out"].values())
        documents_kept = sum(c["documents"] for c in steps[-1]["out"].values())
        print(f"  {documents_read:,} documents read, {documents_kept:,} kept, {sum(report['tokens'].values()):,} "
              f"tokens in {len(report['tokens'])} languages")
    if "tokenize" in parts:
        tokenize_side_by_side(out, overrides)
    shutil.rmtree(root, ignore_errors=True)


def tokenize_side_by_side(out: Path, overrides: list[str]) -> None:
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from data_tools.pipeline.config import load_pipeline_config
    from data_tools.pipeline.run import run_pipeline
    from data_tools.pipeline.stages import marker
    from data_tools.token_files import token_dtype

    cleaned = sorted((out / "cleaned").glob("*.jsonl"))
    cleaned_mb = sum(p.stat().st_size for p in cleaned) / 1e6
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer" / "tokenizer.model"))
    dtype = token_dtype(processor.get_piece_size())
    plain = out / "plain-tokens"
    plain.mkdir()
    started = time.perf_counter()
    builders: dict[str, IndexedDatasetBuilder] = {}
    for path in cleaned:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record["lang"] not in builders:
                    builders[record["lang"]] = IndexedDatasetBuilder(str(plain / f"{record['lang']}.bin"), dtype=dtype)
                ids = processor.encode(record["text"])
                ids.append(processor.eos_id())
                builders[record["lang"]].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
    for language, builder in builders.items():
        builder.finalize(str(plain / f"{language}.idx"))
    plain_seconds = time.perf_counter() - started

    config = load_pipeline_config(overrides)
    for stage in ("tokenize", "merge"):
        for task in range(len(cleaned)):
            marker(config, stage, task).unlink(missing_ok=True)
    started = time.perf_counter()
    run_pipeline(config, show_progress=False)
    ours_seconds = time.perf_counter() - started
    identical = all((plain / f"{language}.{suffix}").read_bytes() == (out / "tokens" / f"{language}.{suffix}")
                    .read_bytes() for language in builders for suffix in ("bin", "idx"))
    print(f"tokenisation of {cleaned_mb:.1f} MB cleaned text into {len(builders)} languages:")
    print(f"  plain sentencepiece loop, 1 process   {plain_seconds:7.2f} s {cleaned_mb / plain_seconds:7.2f} MB/s")
    print(f"  pipeline tokenize + merge, 2 workers  {ours_seconds:7.2f} s {cleaned_mb / ours_seconds:7.2f} MB/s")
    print(f"  speed-up {plain_seconds / ours_seconds:.2f}x; token files identical: {identical}")


def real_corpus() -> None:
    """The second bundled real corpus with default keys: per-stage throughput and memory from the report,
    the whole run's peak, and where the clean stage spends its time (each step timed over all documents)."""
    corpus = Path(__file__).resolve().parents[1] / "data_tools" / "samples" / "gettext_sample.jsonl.gz"
    root = Path(tempfile.mkdtemp(prefix="bloomtrain-data-bench-"))
    out = root / "out"
    overrides = [f"input.paths=[{corpus}]", f"output.dir={out}"]
    elapsed, peak_tree, _ = run_with_peak_memory([sys.executable, "-m", "data_tools.pipeline", *overrides])
    report = json.loads((out / "report" / "report.json").read_text())
    text_mb = report["stages"]["clean"]["megabytes"]
    print(f"gettext corpus ({text_mb:.1f} MB of text, {report['stages']['clean']['documents']:,} documents), "
          f"defaults, 1 worker: {elapsed:.1f} s end to end, peak memory {peak_tree:.0f} MB")
    print(f"  {'stage':10}{'task s':>8}{'MB':>8}{'MB/s':>8}{'peak RSS MB':>13}")
    for stage, measures in report["stages"].items():
        rate = f"{measures['mb_per_second']:.2f}" if measures["mb_per_second"] else "-"
        print(f"  {stage:10}{measures['task_seconds']:>8.2f}{measures['megabytes']:>8.2f}{rate:>8}"
              f"{measures['peak_rss_mb']:>13.0f}")
    profile_clean_stage(out)
    shutil.rmtree(root, ignore_errors=True)


def profile_clean_stage(out: Path) -> None:
    from data_tools.minhash import MinHasher
    from data_tools.pipeline.config import load_pipeline_config
    from data_tools.pipeline.run import prepare
    from data_tools.steps.dedup_exact import dedup_key
    from data_tools.steps.langid import LanguageId
    from data_tools.steps.normalize import Normalize
    from data_tools.steps.pii import RedactPII
    from data_tools.steps.quality import QualityFilter
    from data_tools.steps.read import DocumentReader

    corpus = Path(__file__).resolve().parents[1] / "data_tools" / "samples" / "gettext_sample.jsonl.gz"
    config = load_pipeline_config([f"input.paths=[{corpus}]", f"output.dir={out}-profile"])
    shard = prepare(config)[0]
    timings: list[tuple[str, float]] = []

    def timed(name: str, make):
        started = time.perf_counter()
        result = make()
        timings.append((name, time.perf_counter() - started))
        return result

    steps = timed("set-up (fastText model, word lists)",
                  lambda: [Normalize(), LanguageId({}, 0.0, False), QualityFilter({}, None, True), RedactPII()])
    documents = timed("read + parse JSON", lambda: list(DocumentReader("text", "id", None, 10_000_000).read(shard)))
    megabytes = sum(len(d.text.encode()) for d in documents) / 1e6
    for step in steps:
        documents = timed(step.name, lambda step=step, documents=documents: list(step.run(documents)))
    hasher = MinHasher(config.dedup.minhash_parameters())
    timed("dedup keys + MinHash signatures", lambda: ([dedup_key(d.text) for d in documents],
                                                      hasher.signatures([d.text for d in documents],
                                                                        [d.language for d in documents])))
    total = sum(seconds for _, seconds in timings)
    print(f"clean stage profile ({megabytes:.1f} MB of text in one process):")
    for name, seconds in timings:
        print(f"  {name:36}{seconds:7.2f} s {seconds / total:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=50, help="near-dedup corpus size")
    parser.add_argument("--prose-megabytes", type=float, default=20, help="pipeline/tokenize corpus size")
    parser.add_argument("--parts", default="near_dedup,tokenize,pipeline,real_corpus")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if "near_dedup" in parts:
        near_dedup(args.megabytes)
    if parts & {"tokenize", "pipeline"}:
        pipeline_and_tokenize(args.prose_megabytes, parts)
    if "real_corpus" in parts:
        real_corpus()


if __name__ == "__main__":
    main()
