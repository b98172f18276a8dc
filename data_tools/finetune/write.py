"""Token files, the fine-tuning blend and the report.

Per source and split: ``tokens/<split>/<source>.bin/.idx`` (one document per example: its turns, each
ended by EOS) and ``tokens/<split>/<source>.loss_mask.bin/.idx`` (uint8, the same lengths: 1 where the
loss is taken). Given valid/test files are used as given; otherwise each train record goes to valid or
test by a hash of its content (``split.*_fraction``), so the split depends on nothing else.

``blend.json``: ``{"kind": "finetune", "tokenizer", "seq_length", "datasets": [{"name", "weight",
"train" | "valid" | "test": {"prefix", "loss_mask", "examples", "tokens", "target_tokens"}}]}``.
``report.json``: per source, the records read, the examples kept per split and the skipped ones per
reason (with one example of each).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from bloomtrain.data.blend import FINETUNE_KIND
from bloomtrain.data.tokenizer import TokenEncoder, install_tokenizer
from data_tools.finetune.config import SPLITS, FinetuneConfig, SourceConfig
from data_tools.finetune.encode import encode_example
from data_tools.finetune.records import BadRecord, input_files, read_records, to_turns
from data_tools.token_files import token_dtype


def resolve_tokenizer(path: str | Path) -> Path:
    """A run or a checkpoint stands for the tokenizer it trained with (its ``tokenizer/``)."""
    path = Path(path)
    for folder in (path / "checkpoints", path):
        if (folder / "latest").is_file():
            return folder / (folder / "latest").read_text().strip() / "tokenizer"
    if (path / "meta.json").is_file() and (path / "tokenizer").is_dir():
        return path / "tokenizer"
    return path


def split_of(record: dict, valid_fraction: float, test_fraction: float) -> str:
    share = xxhash.xxh3_64_intdigest(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()) / 2**64
    return "valid" if share < valid_fraction else "test" if share < valid_fraction + test_fraction else "train"


def records_by_split(source: SourceConfig, config: FinetuneConfig):
    """``(split, record or BadRecord)`` of every record the source names."""
    for split in SPLITS:
        for path in input_files(getattr(source, split)):
            for record in read_records(path):
                if split == "train" and not isinstance(record, BadRecord) and (
                        not source.valid or not source.test):
                    held = split_of(record, 0 if source.valid else config.split.valid_fraction,
                                    0 if source.test else config.split.test_fraction)
                    yield held, record
                else:
                    yield split, record


class _SplitWriter:
    def __init__(self, prefix: Path, vocab_size: int) -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.tokens = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
        self.mask = IndexedDatasetBuilder(f"{prefix}.loss_mask.bin", dtype=np.uint8)
        self.examples = self.token_count = self.target_tokens = 0

    def add(self, tokens: list[int], mask: list[int]) -> None:
        self.tokens.add_document(np.asarray(tokens, dtype=self.tokens.dtype), [len(tokens)])
        self.mask.add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
        self.examples += 1
        self.token_count += len(tokens)
        self.target_tokens += sum(mask)

    def finish(self, root: Path) -> dict[str, Any]:
        self.tokens.finalize(f"{self.prefix}.idx")
        self.mask.finalize(f"{self.prefix}.loss_mask.idx")
        relative = self.prefix.relative_to(root)
        return {"prefix": str(relative), "loss_mask": f"{relative}.loss_mask", "examples": self.examples,
                "tokens": self.token_count, "target_tokens": self.target_tokens}


def prepare(config: FinetuneConfig) -> dict[str, Any]:
    """Write everything under ``output.dir``; returns the report."""
    for source in config.sources:  # every input exists before anything is written
        for split in SPLITS:
            input_files(getattr(source, split))
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    install_tokenizer(resolve_tokenizer(config.tokenizer.path), out / "tokenizer")
    encoder = TokenEncoder(out / "tokenizer")
    blend: dict[str, Any] = {"kind": FINETUNE_KIND, "tokenizer": "tokenizer", "seq_length": config.seq_length,
                             "datasets": []}
    report: dict[str, Any] = {"sources": {}}
    for source in config.sources:
        writers = {split: _SplitWriter(out / "tokens" / split / source.name, encoder.vocab_size) for split in SPLITS}
        read, skipped, example_of = 0, Counter(), {}
        for split, record in tqdm(records_by_split(source, config), desc=source.name, unit=" records",
                                  mininterval=2):
            read += 1
            turns = record if isinstance(record, BadRecord) else to_turns(record, source.prompt, source.target,
                                                                          source.format)
            encoded = turns if isinstance(turns, BadRecord) else encode_example(encoder, turns, config.seq_length)
            if isinstance(encoded, BadRecord):
                skipped[encoded.reason] += 1
                example_of.setdefault(encoded.reason, f"{split}: {encoded.detail}")
                continue
            writers[split].add(*encoded)
        splits = {split: writer.finish(out) for split, writer in writers.items()}
        blend["datasets"].append({"name": source.name, "weight": source.weight, **splits})
        report["sources"][source.name] = {"read": read, "kept": {split: s["examples"] for split, s in splits.items()},
                                          "skipped": dict(skipped), "example_of_skipped": example_of}
    (out / "blend.json").write_text(json.dumps(blend, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    reasons = sorted({reason for source in report["sources"].values() for reason in source["skipped"]})
    header = f"{'source':28}{'read':>8}{'train':>8}{'valid':>8}{'test':>8}" + "".join(f"{r:>16}" for r in reasons)
    lines = [header]
    for name, source in report["sources"].items():
        kept = source["kept"]
        lines.append(f"{name:28}{source['read']:>8}{kept['train']:>8}{kept['valid']:>8}{kept['test']:>8}"
                     + "".join(f"{source['skipped'].get(r, 0):>16}" for r in reasons))
    for name, source in report["sources"].items():
        for reason, example in source["example_of_skipped"].items():
            lines.append(f"  {name}: {reason}, e.g. {example}")
    return "\n".join(lines)
