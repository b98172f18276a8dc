"""Readers: documents from JSON Lines (plain, gzip, zstd), Parquet and plain text, streamed.

Nothing is read whole into memory: JSON Lines and text stream line by line (through a decompressor
where needed), Parquet by record batch. Bad input never stops a run and is never dropped silently:
each bad record is counted under a named reason (``malformed_json``, ``invalid_utf8``,
``missing_text``, ``non_string_text``, ``empty``, ``oversized``) in the reader's statistics.
Document ids default to ``<file name>:<line or row>`` when the id field is absent.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_tools.steps.base import Document, StepStats

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """An input path that cannot be read at all (missing, unreadable, unknown format): stops before work."""


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs), sorted; an InputError names what matched nothing."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise InputError(f"input.paths: {pattern!r} matches no file")
        for path in matches:
            if not path.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES):
                raise InputError(f"input.paths: {path} is not JSON Lines (.jsonl[.gz|.zst]), Parquet or text (.txt)")
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                raise InputError(f"input.paths: cannot read {path}: {error.strerror}") from None
        files.extend(matches)
    return sorted(dict.fromkeys(files))


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


class DocumentReader:
    """Reads files into documents; ``stats`` counts what came in and what was bad, per reason."""

    name = "read"

    def __init__(self, text_field: str = "text", id_field: str = "id", lang_field: str | None = None,
                 max_bytes: int = 10_000_000) -> None:
        self.text_field, self.id_field, self.lang_field = text_field, id_field, lang_field
        self.max_bytes = max_bytes
        self.stats = StepStats(self.name)

    def read(self, path: Path) -> Iterator[Document]:
        if path.name.endswith(PARQUET_SUFFIXES):
            records = self._parquet_records(path)
        elif path.name.endswith(TEXT_SUFFIXES):
            records = self._text_records(path)
        else:
            records = self._jsonl_records(path)
        for position, record in records:
            document = self._document(path, position, record)
            if document is not None:
                self.stats.record_out(document)
                yield document

    def _jsonl_records(self, path: Path) -> Iterator[tuple[int, dict]]:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.stats.record_drop("invalid_utf8")
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    self.stats.record_drop("malformed_json")
                    continue
                if not isinstance(record, dict):
                    self.stats.record_drop("malformed_json")
                    continue
                yield number, record

    def _text_records(self, path: Path) -> Iterator[tuple[int, dict]]:
        # A plain-text file is one document; read in one pass but capped at max_bytes + 1.
        with _open_binary(path) as handle:
            raw = handle.read(self.max_bytes + 1)
        if len(raw) > self.max_bytes:
            self.stats.record_drop("oversized")
            return
        try:
            yield 1, {self.text_field: raw.decode("utf-8")}
        except UnicodeDecodeError:
            self.stats.record_drop("invalid_utf8")

    def _parquet_records(self, path: Path) -> Iterator[tuple[int, dict]]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record

    def _document(self, path: Path, position: int, record: dict) -> Document | None:
        if self.text_field not in record or record[self.text_field] is None:
            self.stats.record_drop("missing_text")
            return None
        text = record[self.text_field]
        if not isinstance(text, str):
            self.stats.record_drop("non_string_text")
            return None
        if not text.strip():
            self.stats.record_drop("empty")
            return None
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates, e.g. from "\\ud800" escapes in JSON
            self.stats.record_drop("invalid_utf8")
            return None
        if size > self.max_bytes:
            self.stats.record_drop("oversized")
            return None
        identifier = record.get(self.id_field)
        document_id = str(identifier) if identifier not in (None, "") else f"{path.name}:{position}"
        lang = record.get(self.lang_field) if self.lang_field else None
        return Document(document_id, text, lang=lang if isinstance(lang, str) and lang else None)

