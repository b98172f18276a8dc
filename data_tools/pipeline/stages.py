"""The pipeline's stages, each a function of (config, task index) that an executor can run anywhere.

    clean     per shard: read -> normalise -> language id -> quality -> PII; keys for dedup and the split
    dedup     once: exact duplicates (first in input order wins) and MinHash near-duplicate clusters; then,
              among the survivors, each language's held-out validation documents
    split     per shard: the kept documents -> cleaned/<shard>.jsonl, each marked "split": train | valid
    tokenizer once: sentencepiece on a language-balanced sample of the training documents (temperature
              alpha), or the given one (a sentencepiece model or a Hugging Face tokenizer.json, e.g. BLOOM's)
    tokenize  per shard: one partial .bin/.idx per language and split
    merge     once: per language, the partials in input order -> tokens/<lang>.bin/.idx and
              tokens/valid/<lang>.bin/.idx; blend.json

Every task writes into temporary names and renames, then leaves a completion marker; a rerun skips
tasks whose marker exists, so it redoes only unfinished work and ends with the same bytes. Because
tasks are per shard (a file, or a byte range / row groups of a large one, see ``steps/read.py``) and
merged in input order, the output does not depend on the worker count.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_tools.errors import DataError
from data_tools.pipeline.config import PipelineConfig
from data_tools.steps.base import Document, StepStats
from data_tools.steps.read import InputShard

WORK = "work"


class Processed(NamedTuple):
    """What a task got through, for the progress bars' docs/s and MB/s."""

    documents: int = 0
    bytes: int = 0


def work_dir(config: PipelineConfig) -> Path:
    return Path(config.output.dir) / WORK


def marker(config: PipelineConfig, stage: str, task: int) -> Path:
    return work_dir(config) / "done" / f"{stage}-{task:05d}"


def _shard(task: int) -> str:
    return f"{task:05d}"


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    write(staging)
    os.replace(staging, path)


def _save_json(path: Path, value) -> None:
    _write_atomically(path, lambda p: p.write_text(json.dumps(value)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(staging: Path) -> None:
        with open(staging, "wb") as handle:
            np.save(handle, array)

    _write_atomically(path, write)


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


# ---------------------------------------------------------------------------------------------- clean

def clean(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    from data_tools.minhash import MinHasher, band_keys
    from data_tools.steps.dedup_exact import dedup_key
    from data_tools.steps.langid import LanguageId
    from data_tools.steps.normalize import Normalize
    from data_tools.steps.pii import RedactPII
    from data_tools.steps.quality import QualityFilter
    from data_tools.steps.read import DocumentReader
    from data_tools.validation_split import split_key

    reader = DocumentReader(config.input.text_field, config.input.id_field, config.input.lang_field,
                            config.input.max_document_bytes)
    steps = []
    if config.normalize:
        steps.append(Normalize())
    steps.append(LanguageId(dict(config.language_id.thresholds), config.language_id.default_threshold,
                            config.language_id.trust_source))
    if config.quality.enabled:
        steps.append(QualityFilter(dict(config.quality.overrides), config.quality.word_lists_dir,
                                   config.quality.packaged_word_lists))
        if config.quality.perplexity:
            from data_tools.steps.perplexity import PerplexityFilter

            steps.append(PerplexityFilter(dict(config.quality.perplexity)))
    if config.pii:
        steps.append(RedactPII())
    documents = reader.read(shards[task])
    for step in steps:
        documents = step.run(documents)
    kept: list[Document] = list(documents)

    out = work_dir(config) / "clean"
    _write_atomically(out / f"{_shard(task)}.jsonl", lambda p: p.write_text(
        "".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in kept), encoding="utf-8"))
    _save_json(out / f"{_shard(task)}.stats.json", [s.stats.to_json() for s in (reader, *steps)])
    _save_npy(out / f"{_shard(task)}.exact.npy", np.array([dedup_key(d.text) for d in kept], dtype=np.uint64))
    _save_npy(out / f"{_shard(task)}.split.npy", np.array([split_key(d.id, d.text) for d in kept], dtype=np.uint64))
    _save_json(out / f"{_shard(task)}.langs.json", [d.language for d in kept])
    if config.dedup.near:
        parameters = config.dedup.minhash_parameters()
        signatures = MinHasher(parameters).signatures([d.text for d in kept], [d.language for d in kept])
        _save_npy(out / f"{_shard(task)}.signatures.npy", signatures)
        # band-major, so the dedup stage reads one band of every shard at a time
        _save_npy(out / f"{_shard(task)}.bands.npy", np.ascontiguousarray(band_keys(signatures, parameters).T))
    return Processed(sum(c["documents"] for c in reader.stats.outputs.values()),
                     sum(c["bytes"] for c in reader.stats.outputs.values()))


# ---------------------------------------------------------------------------------------------- dedup

def dedup(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    """Decide, over all files at once, which documents go; one mask per file. Memory stays at a few dozen
    bytes per document: keys are loaded as compact arrays, and near-duplicate clustering reads one band
    of every shard at a time and signatures only for candidate pairs (memory-mapped)."""
    from data_tools.minhash import cluster_roots
    from data_tools.steps.dedup_exact import exact_duplicates
    from data_tools.validation_split import validation_mask

    clean_dir = work_dir(config) / "clean"
    names = [_shard(i) for i in range(len(shards))]
    flat_keys = _concatenate([np.load(clean_dir / f"{name}.exact.npy") for name in names], np.uint64)
    offsets = np.cumsum([0] + [np.load(clean_dir / f"{name}.exact.npy", mmap_mode="r").size for name in names])
    reason = np.zeros(flat_keys.size, dtype=np.int8)  # 0 kept, 1 exact duplicate, 2 near duplicate
    if config.dedup.exact:
        reason[exact_duplicates(flat_keys)] = 1
    del flat_keys
    if config.dedup.near and reason.size:
        parameters = config.dedup.minhash_parameters()
        survivors = np.flatnonzero(reason == 0)
        band_files = [np.load(clean_dir / f"{name}.bands.npy", mmap_mode="r") for name in names]
        signature_files = [np.load(clean_dir / f"{name}.signatures.npy", mmap_mode="r") for name in names]

        def rows(indices: np.ndarray) -> np.ndarray:
            documents = survivors[indices]
            shard_of = np.searchsorted(offsets, documents, side="right") - 1
            result = np.empty((documents.size, parameters.num_perm), dtype=np.uint32)
            for shard in np.unique(shard_of):
                chosen = shard_of == shard
                result[chosen] = signature_files[shard][documents[chosen] - offsets[shard]]
            return result

        bands = (np.concatenate([keys[band] for keys in band_files])[survivors] for band in range(parameters.bands))
        roots = cluster_roots(bands, rows, survivors.size, parameters)
        reason[survivors[roots != np.arange(survivors.size)]] = 2
    kept = np.flatnonzero(reason == 0)
    if not kept.size:
        raise DataError(_nothing_survived(config, len(shards)))
    split_keys = _concatenate([np.load(clean_dir / f"{name}.split.npy") for name in names], np.uint64)
    names_of_languages: dict[str, int] = {}
    languages = _concatenate([np.array([names_of_languages.setdefault(language, len(names_of_languages))
                                        for language in json.loads((clean_dir / f"{name}.langs.json").read_text())],
                                       dtype=np.int32) for name in names], np.int32)
    valid = np.zeros(reason.size, dtype=bool)
    valid[kept] = validation_mask(split_keys[kept], languages[kept], config.split.valid_fraction,
                                  config.split.min_valid_documents, config.split.max_valid_documents)
    for i, name in enumerate(names):
        _save_npy(work_dir(config) / "dedup" / f"{name}.reason.npy", reason[offsets[i]:offsets[i + 1]])
        _save_npy(work_dir(config) / "dedup" / f"{name}.valid.npy", valid[offsets[i]:offsets[i + 1]])
    return Processed(int(reason.size))


def _concatenate(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _nothing_survived(config: PipelineConfig, shards: int) -> str:
    """Why no document is left, from the clean stage's statistics, and what to change."""
    stats: dict[str, StepStats] = {}
    for i in range(shards):
        for record in json.loads((work_dir(config) / "clean" / f"{_shard(i)}.stats.json").read_text()):
            stats.setdefault(record["step"], StepStats(record["step"])).merge(StepStats.from_json(record))
    read = sum(counts["documents"] for counts in stats["read"].outputs.values())
    reasons = sorted(((sum(by_language.values()), f"{step.step}: {reason}") for step in stats.values()
                      for reason, by_language in step.dropped.items()), reverse=True)
    why = ", ".join(f"{name} {count:,}" for count, name in reasons[:4]) or "none dropped by cleaning"
    if not read:
        return (f"no document was read from input.paths (dropped: {why}); check that input.text_field="
                f"{config.input.text_field!r} names the field holding the text")
    return (f"no document survived cleaning ({read:,} read; dropped: {why}); the counts per shard are in "
            "work/clean/*.stats.json; relax the step that drops them (quality.enabled=false, "
            "language_id.default_threshold=0, quality.overrides.<lang>...)")


# ---------------------------------------------------------------------------------------------- split

DEDUP_REASONS = {1: "exact_duplicate", 2: "near_duplicate"}
SPLITS = ("train", "valid")
TOKEN_DIRS = {"train": "tokens", "valid": "tokens/valid"}  # under output.dir


def split(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    out = work_dir(config)
    reasons = np.load(out / "dedup" / f"{_shard(task)}.reason.npy")
    held_out = np.load(out / "dedup" / f"{_shard(task)}.valid.npy")
    stats = StepStats("dedup")
    lines = []
    for record, reason, valid in zip(_read_jsonl(out / "clean" / f"{_shard(task)}.jsonl"), reasons, held_out,
                                     strict=True):
        document = Document(record["id"], record["text"], record["lang"])
        stats.record_in(document)
        if reason:
            stats.record_drop(DEDUP_REASONS[int(reason)], document.language)
            continue
        stats.record_out(document)
        if valid:
            stats.count("valid_documents")
        lines.append(json.dumps({"id": record["id"], "text": record["text"], "lang": record["lang"],
                                 "split": "valid" if valid else "train"}, ensure_ascii=False) + "\n")
    cleaned = Path(config.output.dir) / "cleaned" / f"{_shard(task)}.jsonl"
    _write_atomically(cleaned, lambda p: p.write_text("".join(lines), encoding="utf-8"))
    _save_json(out / "dedup" / f"{_shard(task)}.stats.json", stats.to_json())
    return Processed(len(reasons), cleaned.stat().st_size)


# ------------------------------------------------------------------------------------------- tokenizer

def tokenizer(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    from bloomtrain.data.tokenizer import install_tokenizer
    from data_tools.tokenizer_training import train_tokenizer

    target = Path(config.output.dir) / "tokenizer"
    staging = target.with_name("tokenizer.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    texts: list[str] = []
    if config.tokenizer.existing:
        install_tokenizer(config.tokenizer.existing, staging)
    else:
        texts = balanced_sample(config, len(shards))
        train_tokenizer(texts, staging / "tokenizer", config.tokenizer.vocab_size, config.tokenizer.model_type,
                        config.tokenizer.special_tokens, config.tokenizer.character_coverage)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return Processed(len(texts), sum(len(text.encode("utf-8")) for text in texts))


def balanced_sample(config: PipelineConfig, shards: int) -> list[str]:
    """Up to ``tokenizer.sample_bytes`` of cleaned training text (validation documents stay unseen),
    languages weighted by (share of bytes) ** alpha."""
    from bloomtrain.data.blend import temperature_weights

    sizes: dict[str, int] = defaultdict(int)
    for i in range(shards):
        for language, counts in json.loads((work_dir(config) / "dedup" / f"{_shard(i)}.stats.json").read_text())[
                "out"].items():
            sizes[language] += counts["bytes"]
    if not sizes:
        raise DataError("no training document is left (every survivor was held out for validation); lower "
                        "split.min_valid_documents or split.valid_fraction")
    budget = {language: weight * config.tokenizer.sample_bytes
              for language, weight in temperature_weights(dict(sizes), config.tokenizer.alpha).items()}
    texts = []
    for i in range(shards):
        for record in _read_jsonl(Path(config.output.dir) / "cleaned" / f"{_shard(i)}.jsonl"):
            if record["split"] == "train" and budget[record["lang"]] > 0:
                budget[record["lang"]] -= len(record["text"].encode("utf-8"))
                texts.append(record["text"])
    return texts


# ------------------------------------------------------------------------------------- tokenize, merge

def tokenize(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    from data_tools.token_files import write_token_files

    by_split: dict[str, dict[str, list[str]]] = {split: defaultdict(list) for split in SPLITS}
    cleaned = Path(config.output.dir) / "cleaned" / f"{_shard(task)}.jsonl"
    for record in _read_jsonl(cleaned):
        by_split[record["split"]][record["lang"]].append(record["text"])
    out = work_dir(config) / "tokens" / _shard(task)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    counts = {split: write_token_files(by_language, Path(config.output.dir) / "tokenizer", staging / split)
              for split, by_language in by_split.items()}
    (staging / "counts.json").write_text(json.dumps(counts))
    (staging / "text.json").write_text(json.dumps({split: {language: text_measures(texts, language)
                                                           for language, texts in by_language.items()}
                                                   for split, by_language in by_split.items()}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    documents = sum(len(texts) for by_language in by_split.values() for texts in by_language.values())
    return Processed(documents, cleaned.stat().st_size)


def text_measures(texts: list[str], language: str) -> dict[str, int]:
    """What fertility is measured against: documents, words (whitespace-separated) and characters."""
    return {"documents": len(texts), "words": sum(len(text.split()) for text in texts),
            "characters": sum(len(text) for text in texts), "bytes": sum(len(text.encode("utf-8")) for text in texts)}


def merge(config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from bloomtrain.data.blend import Blend, BlendEntry, temperature_weights, write_blend
    from bloomtrain.data.tokenizer import TokenEncoder, megatron_path
    from data_tools.token_files import token_dtype

    root = Path(config.output.dir)
    dtype = token_dtype(TokenEncoder(root / "tokenizer").vocab_size)
    totals: dict[str, dict[str, int]] = {split: defaultdict(int) for split in SPLITS}
    partials: dict[str, dict[str, list[Path]]] = {split: defaultdict(list) for split in SPLITS}
    for i in range(len(shards)):
        shard = work_dir(config) / "tokens" / _shard(i)
        for split, counts in json.loads((shard / "counts.json").read_text()).items():
            for language, count in counts.items():
                totals[split][language] += count
                partials[split][language].append(shard / split / language)
    for split in SPLITS:
        tokens = root / TOKEN_DIRS[split]
        tokens.mkdir(parents=True, exist_ok=True)
        for language, prefixes in sorted(partials[split].items()):
            staging = tokens / f"{language}.tmp"
            builder = IndexedDatasetBuilder(f"{staging}.bin", dtype=dtype)
            with _without_forced_garbage_collection():
                for prefix in prefixes:
                    builder.add_index(str(prefix))
            builder.finalize(f"{staging}.idx")
            os.replace(f"{staging}.bin", tokens / f"{language}.bin")
            os.replace(f"{staging}.idx", tokens / f"{language}.idx")
    train, valid = totals["train"], totals["valid"]
    weights = temperature_weights(dict(train), config.blend.alpha)
    entries = [BlendEntry(prefix=f"{TOKEN_DIRS['train']}/{language}", weight=weights[language], lang=language,
                          tokens=train[language],
                          valid_prefix=f"{TOKEN_DIRS['valid']}/{language}" if valid.get(language) else None,
                          valid_tokens=valid.get(language, 0))
               for language in sorted(train) if train[language]]
    tokenizer_path = megatron_path(root / "tokenizer").relative_to(root)
    write_blend(root / "blend.json", Blend(tokenizer=str(tokenizer_path), datasets=entries))
    return Processed(0, (sum(train.values()) + sum(valid.values())) * np.dtype(dtype).itemsize)


@contextlib.contextmanager
def _without_forced_garbage_collection():
    """megatron-core's ``add_index`` calls ``gc.collect()`` for every partial it appends, a quarter of a
    second each once torch is loaded: minutes for thousands of shards. Nothing here needs it."""
    collect = gc.collect
    gc.collect = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        gc.collect = collect


STAGES = [("clean", clean, "per_input"), ("dedup", dedup, "once"), ("split", split, "per_input"),
          ("tokenizer", tokenizer, "once"), ("tokenize", tokenize, "per_input"), ("merge", merge, "once")]


class TaskFailed(RuntimeError):
    """A stage's task failed; the message names it, where to look, and the way on (rerun: finished tasks
    are kept)."""


def run_task(stage: str, config: PipelineConfig, task: int, shards: list[InputShard]) -> Processed:
    """One task of one stage, then its completion marker; returns what it processed."""
    from data_tools.pipeline.measure import TaskMeter

    with TaskMeter() as meter:
        processed = dict((name, function) for name, function, _ in STAGES)[stage](config, task, shards)
    _save_json(work_dir(config) / "timing" / f"{stage}-{task:05d}.json",
               {"seconds": round(meter.seconds, 4), "documents": processed.documents, "bytes": processed.bytes,
                "peak_rss_bytes": meter.peak_bytes})
    done = marker(config, stage, task)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return processed
