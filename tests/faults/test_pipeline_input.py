"""The data pipeline on damaged input: every kind of bad record counted by reason; a truncated gzip, a
truncated or corrupt zstd file, a damaged Parquet file keep what was read before the damage and count the
rest as ``corrupt_file``; a directory or an empty glob as input stops in one line before any work."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from data_tools.steps.read import DocumentReader, InputError, expand_inputs
from tests.conftest import REPO

LINES = "".join(json.dumps({"id": f"d{i}", "text": f"document number {i} " * 20}) + "\n" for i in range(2000))


def _read(path: Path) -> tuple[list, dict]:
    reader = DocumentReader()
    documents = list(reader.read(path))
    return documents, {reason: sum(by_language.values()) for reason, by_language in reader.stats.dropped.items()}


def _damaged(tmp_path: Path, kind: str) -> Path:
    data = LINES.encode()
    if kind == "gzip-truncated":
        path, raw = tmp_path / "part.jsonl.gz", gzip.compress(data)[:3000]
    elif kind == "zstd-truncated":
        path, raw = tmp_path / "part.jsonl.zst", zstandard.ZstdCompressor().compress(data)[:2000]
    elif kind == "zstd-corrupt":
        raw = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
        raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
        path = tmp_path / "part.jsonl.zst"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "part.parquet"
        pq.write_table(pa.table({"text": [f"row {i} " * 30 for i in range(2000)]}), path, row_group_size=500)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3:len(raw) // 3 + 2000] = bytes(2000)
    path.write_bytes(bytes(raw))
    return path


def test_reader_counts_every_kind_of_bad_input(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"id": "a", "text": "good"}), "{not json", json.dumps({"id": "b"}),
             json.dumps({"id": "c", "text": 42}), json.dumps({"id": "d", "text": "   "}),
             json.dumps({"id": "e", "text": "x" * 50}), json.dumps(["a list"]), json.dumps({"text": "no id"}),
             json.dumps({"id": "f", "text": "lone \ud800 surrogate"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(path, "ab") as handle:
        handle.write(b'{"id": "g", "text": "\xff\xfe bad bytes"}\n')
    reader = DocumentReader(max_bytes=40)
    documents = list(reader.read(path))
    assert [d.id for d in documents] == ["a", "mixed.jsonl:8"]
    dropped = {reason: sum(by_lang.values()) for reason, by_lang in reader.stats.dropped.items()}
    assert dropped == {"malformed_json": 2, "missing_text": 1, "non_string_text": 1, "empty": 1, "oversized": 1,
                       "invalid_utf8": 2}


@pytest.mark.parametrize("kind", ["gzip-truncated", "zstd-truncated", "zstd-corrupt", "parquet-damaged"])
def test_a_damaged_file_keeps_what_came_before_and_counts_the_rest(tmp_path, kind, caplog):
    documents, dropped = _read(_damaged(tmp_path, kind))
    assert dropped.get("corrupt_file") == 1, dropped
    assert len(documents) < 2000
    assert all(document.text for document in documents)  # no garbage documents
    assert "is damaged after" in caplog.text and "skipped the rest of it" in caplog.text


def test_intact_compressed_files_read_whole(tmp_path):
    for name, raw in (("a.jsonl.gz", gzip.compress(LINES.encode())),
                      ("b.jsonl.zst", zstandard.ZstdCompressor().compress(LINES.encode()) * 2)):  # two frames
        (tmp_path / name).write_bytes(raw)
        documents, dropped = _read(tmp_path / name)
        assert not dropped and len(documents) == 2000 * (2 if name.endswith(".zst") else 1)


def test_a_directory_or_an_empty_glob_is_one_line(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(InputError, match=r"is a directory; name its files, e.g. '.*corpus/\*\*/\*.jsonl.gz'"):
        expand_inputs([str(tmp_path / "corpus")])
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "corpus" / "*.jsonl")])
    result = subprocess.run([sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{tmp_path / 'corpus'}]",
                             f"output.dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is a directory" in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_input_without_the_text_field_fails_in_one_line_naming_the_key(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-0.jsonl").write_text("".join(json.dumps({"id": str(i), "body": f"Dokument {i} über Daten."}) + "\n"
                                              for i in range(5)), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{raw}/part-*.jsonl]",
                             f"output.dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("data_tools.pipeline: stage dedup, task 0 failed: no document was read")
    assert "missing_text 5" in line and "input.text_field='text'" in line
