"""Readers: documents from JSON Lines (plain, gzip, zstd), Parquet and plain text, streamed.

Nothing is read whole into memory: JSON Lines and text stream line by line (through a decompressor
where needed), Parquet by record batch. A large uncompressed JSON Lines file is read by several tasks,
each taking the lines that start inside its byte range; a large Parquet file by runs of row groups
(:func:`plan_shards`). Compressed files cannot be entered in the middle: one task each.

Bad input never stops a run and is never dropped silently: each bad record is counted under a named
reason (``malformed_json``, ``invalid_utf8``, ``missing_text``, ``non_string_text``, ``empty``,
``oversized``) in the reader's statistics; a damaged compressed or Parquet file (``corrupt_file``) keeps
the documents read before the damage, with a warning naming the file.
Document ids default to ``<file name>:<line or row>`` when the id field is absent
(``<file name>@<byte offset>`` in a byte range of a JSON Lines file, whose line numbers are unknown).
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_tools.errors import DataError
from data_tools.steps.base import Document, StepStats

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
PARQUET_SUFFIXES = (".parquet",)


def _corrupt_file_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    import zstandard

    return EOFError, gzip.BadGzipFile, zstandard.ZstdError, pyarrow.ArrowInvalid, OSError


CORRUPT_FILE_ERRORS = _corrupt_file_errors()


class InputError(DataError):
    """An input path that cannot be read at all (missing, unreadable, unknown format): stops before work."""


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs), sorted; an InputError names what matched nothing."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if len(matches) == 1 and matches[0].is_dir():
            raise InputError(f"input.paths: {pattern!r} is a directory; name its files, e.g. "
                             f"'{matches[0]}/**/*.jsonl.gz'")
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


@dataclass(frozen=True)
class InputShard:
    """What one clean task reads: a whole file, the lines starting in ``[start, stop)`` of an uncompressed
    JSON Lines file, or row groups ``[start, stop)`` of a Parquet file."""

    path: Path
    start: int = 0
    stop: int | None = None  # None: the whole file
    size: int = 0  # the input bytes it covers, for progress

    @property
    def is_part(self) -> bool:
        return self.stop is not None

    def to_json(self) -> list:
        return [str(self.path.resolve()), self.start, self.stop]


def plan_shards(files: list[Path], shard_bytes: int) -> list[InputShard]:
    """Split files larger than ``shard_bytes`` where the format allows; deterministic for given sizes."""
    shards: list[InputShard] = []
    for path in files:
        size = path.stat().st_size
        if size > shard_bytes and path.name.endswith((".jsonl", ".json")):
            count = -(-size // shard_bytes)
            bounds = [size * i // count for i in range(count + 1)]
            shards += [InputShard(path, start, stop, stop - start) for start, stop in itertools.pairwise(bounds)]
        elif size > shard_bytes and path.name.endswith(PARQUET_SUFFIXES):
            shards += _row_group_shards(path, size, shard_bytes)
        else:
            shards.append(InputShard(path, size=size))
    return shards


def _row_group_shards(path: Path, size: int, shard_bytes: int) -> list[InputShard]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    group_bytes = [sum(metadata.row_group(g).column(c).total_compressed_size for c in range(metadata.num_columns))
                   for g in range(metadata.num_row_groups)]
    shards, first, taken = [], 0, 0
    for group, nbytes in enumerate(group_bytes):
        taken += nbytes
        if taken >= shard_bytes or group == len(group_bytes) - 1:
            shards.append(InputShard(path, first, group + 1, taken))
            first, taken = group + 1, 0
    return shards if len(shards) > 1 else [InputShard(path, size=size)]


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame, raising EOFError when it ends inside a frame
    (zstandard's own stream reader ends quietly there, and a truncated file would pass for a short one)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file = open(path, "rb")
        self._frame = self._new()
        self._pending = b""
        self._started = False  # bytes of the current frame seen

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._started and not self._frame.eof:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return 0
            while chunk:
                if self._frame.eof:
                    self._frame, self._started = self._new(), False
                self._started = True
                self._pending += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _jsonl_lines(shard: InputShard) -> Iterator[tuple[str, bytes]]:
    """(position label, raw line) of the lines a shard owns: those whose first byte lies in its range."""
    with _open_binary(shard.path) as handle:
        if not shard.is_part:
            for number, raw in enumerate(handle, start=1):
                yield f":{number}", raw
            return
        position = shard.start
        if position > 0:
            # The line holding byte start-1 belongs to the previous shard (or ends exactly there).
            handle.seek(position - 1)
            position += len(handle.readline()) - 1
        while position < shard.stop:
            raw = handle.readline()
            if not raw:
                break
            yield f"@{position}", raw
            position += len(raw)


class DocumentReader:
    """Reads files into documents; ``stats`` counts what came in and what was bad, per reason."""

    name = "read"

    def __init__(self, text_field: str = "text", id_field: str = "id", lang_field: str | None = None,
                 max_bytes: int = 10_000_000) -> None:
        self.text_field, self.id_field, self.lang_field = text_field, id_field, lang_field
        self.max_bytes = max_bytes
        self.stats = StepStats(self.name)

    def read(self, source: Path | InputShard) -> Iterator[Document]:
        shard = source if isinstance(source, InputShard) else InputShard(Path(source))
        path = shard.path
        if path.name.endswith(PARQUET_SUFFIXES):
            records = self._parquet_records(shard)
        elif path.name.endswith(TEXT_SUFFIXES):
            records = self._text_records(path)
        else:
            records = self._jsonl_records(shard)
        documents = 0
        try:
            for position, record in records:
                document = self._document(path, position, record)
                if document is not None:
                    documents += 1
                    self.stats.record_out(document)
                    yield document
        except CORRUPT_FILE_ERRORS as error:
            # What was read before the damage is kept; the rest of the file cannot be reached.
            self.stats.record_drop("corrupt_file")
            logger.warning("input %s is damaged after %d documents (%s: %s); skipped the rest of it",
                           path, documents, type(error).__name__, error)

    def _jsonl_records(self, shard: InputShard) -> Iterator[tuple[str, dict]]:
        for position, raw in _jsonl_lines(shard):
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
            yield position, record

    def _text_records(self, path: Path) -> Iterator[tuple[str, dict]]:
        # A plain-text file is one document; read in one pass but capped at max_bytes + 1.
        with _open_binary(path) as handle:
            raw = handle.read(self.max_bytes + 1)
        if len(raw) > self.max_bytes:
            self.stats.record_drop("oversized")
            return
        try:
            yield ":1", {self.text_field: raw.decode("utf-8")}
        except UnicodeDecodeError:
            self.stats.record_drop("invalid_utf8")

    def _parquet_records(self, shard: InputShard) -> Iterator[tuple[str, dict]]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(shard.path)
        groups = range(shard.start, shard.stop) if shard.is_part else range(parquet.metadata.num_row_groups)
        row = sum(parquet.metadata.row_group(g).num_rows for g in range(groups.start))
        for batch in parquet.iter_batches(batch_size=1024, row_groups=list(groups)):
            for record in batch.to_pylist():
                row += 1
                yield f":{row}", record

    def _document(self, path: Path, position: str, record: dict) -> Document | None:
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
        document_id = str(identifier) if identifier not in (None, "") else f"{path.name}{position}"
        lang = record.get(self.lang_field) if self.lang_field else None
        return Document(document_id, text, lang=lang if isinstance(lang, str) and lang else None)

