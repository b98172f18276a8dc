"""The data pipeline end to end: a mixed corpus with planted duplicates and bad lines, worker counts,
kill and rerun, token files read back with megatron-core, training from its blend file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools.pipeline.config import load_pipeline_config
from data_tools.pipeline.slurm import refuse_while_running
from data_tools.sample import SAMPLE_CORPUS
from data_tools.steps.read import InputError
from tests.conftest import REPO, run_train

SHARDS = 8


def _words_jaccard(first: str, second: str, language: str) -> float:
    if language in ("zh", "ja"):
        a = {first[i:i + 5] for i in range(len(first) - 4)}
        b = {second[i:i + 5] for i in range(len(second) - 4)}
    else:
        a = set(zip(*[first.split()[k:] for k in range(5)], strict=False))
        b = set(zip(*[second.split()[k:] for k in range(5)], strict=False))
    return len(a & b) / len(a | b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """The bundled UDHR sample split into shards, plus planted copies and bad lines."""
    rng = random.Random(0)
    originals = [json.loads(line) for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [{"id": f"orig-{i}", "text": d["text"], "lang_hint": d["lang"]} for i, d in enumerate(originals)]
    exact, near = {}, {}
    for i in rng.sample(range(len(originals)), 25):
        text = originals[i]["text"]
        # The same text with other spacing, punctuation and digits: an exact duplicate after normalising.
        copy = " ".join(text.split()).replace(",", " ,").replace(".", "!") + " 2024"
        exact[f"exact-{i}"] = f"orig-{i}"
        records.append({"id": f"exact-{i}", "text": copy})
    for i in rng.sample(range(len(originals)), 60):
        text, language = originals[i]["text"], originals[i]["lang"]
        if language in ("zh", "ja"):
            position = rng.randrange(len(text) // 2, len(text))
            copy = text[:position] + "字" + text[position + 1:]
        else:
            words = text.split()
            if len(words) < 60:
                continue
            words[rng.randrange(len(words))] = "zzzedited"
            copy = " ".join(words)
        if _words_jaccard(text, copy, language) >= 0.8 and f"exact-{i}" not in exact:
            near[f"near-{i}"] = f"orig-{i}"
            records.append({"id": f"near-{i}", "text": copy})
    rng.shuffle(records)
    folder = tmp_path_factory.mktemp("raw")
    for shard in range(SHARDS):
        lines = [json.dumps(r, ensure_ascii=False) for r in records[shard::SHARDS]]
        lines += ["{broken json", json.dumps({"id": f"empty-{shard}", "text": "  "}),
                  json.dumps({"id": f"number-{shard}", "text": 7})]
        (folder / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with open(folder / f"part-{shard}.jsonl", "ab") as handle:
            handle.write(b'{"id": "bad-utf8", "text": "\xc3\x28"}\n')
    return folder, {"exact": exact, "near": near}


def _pipeline(raw: Path, out: Path, *extra: str, check: bool = True,
              pattern: str = "part-*.jsonl") -> subprocess.CompletedProcess:
    # Quality filters off: UDHR articles are short, and this test is about dedup and bookkeeping.
    command = [sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{raw}/{pattern}]",
               f"output.dir={out}", "quality.enabled=false", "tokenizer.vocab_size=4096", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if check and result.returncode:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-5000:])
    return result


def _tree_bytes(out: Path) -> dict[str, bytes]:
    folders = ("cleaned", "tokens", "tokenizer")
    files = {str(p.relative_to(out)): p.read_bytes() for folder in folders for p in (out / folder).rglob("*")
             if p.is_file()}
    files["blend.json"] = (out / "blend.json").read_bytes()
    return files


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("one") / "out"
    return out, _pipeline(corpus[0], out)


@pytest.mark.slow
def test_duplicates_removed_and_distinct_documents_kept(corpus, one_worker):
    _, planted = corpus
    out, result = one_worker
    kept = {json.loads(line)["id"] for path in sorted((out / "cleaned").glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()}
    # Input order decides which of a pair stays (the first read), so exactly one of each pair is kept.
    for copy, original in planted["exact"].items():
        assert (copy in kept) != (original in kept), (copy, original)
    near_found = [copy for copy, original in planted["near"].items() if (copy in kept) != (original in kept)]
    assert len(near_found) / len(planted["near"]) >= 0.95
    assert all(original in kept or copy in kept for copy, original in planted["near"].items())
    paired = set(planted["exact"]) | set(planted["exact"].values()) | set(planted["near"]) | \
        set(planted["near"].values())
    assert {i for i in _clean_ids(out) if i not in paired} <= kept, "a distinct document was removed"
    assert "exact_duplicate" in result.stdout and "near_duplicate" in result.stdout


def _clean_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for path in sorted((out / "work" / "clean").glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_bad_input_is_counted_not_fatal(one_worker):
    out, result = one_worker
    report = json.loads((out / "report" / "report.json").read_text())
    read = next(step for step in report["steps"] if step["step"] == "read")
    dropped = {reason: sum(by_language.values()) for reason, by_language in read["dropped"].items()}
    assert dropped == {"malformed_json": SHARDS, "empty": SHARDS, "non_string_text": SHARDS, "invalid_utf8": SHARDS}
    assert (out / "report" / "funnel.png").stat().st_size > 1000
    assert "malformed_json" in result.stdout


@pytest.mark.slow
def test_token_files_decode_to_the_cleaned_text(one_worker):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, _ = one_worker
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer" / "tokenizer.model"))
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "valid": {}}
    for record in _cleaned(out):
        by_split[record["split"]].setdefault(record["lang"], []).append(record["text"])
    blend = json.loads((out / "blend.json").read_text())
    assert {entry["lang"] for entry in blend["datasets"]} == set(by_split["train"])
    assert {entry["lang"] for entry in blend["datasets"] if entry["valid_prefix"]} == set(by_split["valid"])
    assert sum(entry["weight"] for entry in blend["datasets"]) == pytest.approx(1.0)
    for split, folder in (("train", out / "tokens"), ("valid", out / "tokens" / "valid")):
        for language, texts in by_split[split].items():
            dataset = IndexedDataset(str(folder / language))
            assert len(dataset) == len(texts)
            for index in range(0, len(texts), 7 if split == "train" else 1):
                ids = dataset[index].tolist()
                assert ids[-1] == processor.eos_id()
                assert processor.decode(ids[:-1]) == texts[index]


def _cleaned(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "cleaned").glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_validation_documents_are_held_out_and_no_duplicate_leaks_across(one_worker):
    """Each language holds out 1% of its documents (at least one); a document is in exactly one split, and
    no validation document has an exact or near duplicate among the training documents."""
    from data_tools.minhash import MinHasher, estimated_jaccard
    from data_tools.steps.dedup_exact import dedup_key

    out, _ = one_worker
    records = _cleaned(out)
    assert len({record["id"] for record in records}) == len(records)  # each document once, in one split
    valid = [record for record in records if record["split"] == "valid"]
    train = [record for record in records if record["split"] == "train"]
    documents = Counter(record["lang"] for record in records)
    held_out = Counter(record["lang"] for record in valid)
    # At least one per language, never a language's only document; 1% of 31 articles rounds to none.
    assert held_out == {language: 1 for language, count in documents.items() if count >= 2}, (held_out, documents)
    # Dedup ran first: no validation text has an exact (normalised) copy among the training texts ...
    train_keys = {dedup_key(r["text"]) for r in train}
    assert not any(dedup_key(r["text"]) in train_keys for r in valid)
    # ... nor a near copy (MinHash estimate at the dedup threshold).
    hasher = MinHasher()
    valid_signatures = hasher.signatures([r["text"] for r in valid], [r["lang"] for r in valid])
    train_signatures = hasher.signatures([r["text"] for r in train], [r["lang"] for r in train])
    closest = max(estimated_jaccard(v, t) for v in valid_signatures for t in train_signatures)
    assert closest < 0.8, closest  # the near-dedup threshold: nothing that close crosses over
    split_stats = json.loads((out / "report" / "report.json").read_text())
    assert {"valid_documents": len(valid)}.items() <= next(
        step for step in split_stats["steps"] if step["step"] == "dedup")["counters"].items()


@pytest.mark.slow
def test_two_workers_write_the_same_bytes(corpus, one_worker, tmp_path):
    out, _ = one_worker
    _pipeline(corpus[0], tmp_path / "two", "executor.workers=2")
    assert _tree_bytes(tmp_path / "two") == _tree_bytes(out)


@pytest.mark.slow
def test_kill_and_rerun_ends_identical(corpus, one_worker, tmp_path):
    out, _ = one_worker
    target = tmp_path / "killed"
    command = [sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{corpus[0]}/part-*.jsonl]",
               f"output.dir={target}", "quality.enabled=false", "tokenizer.vocab_size=4096"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = target / "work" / "done"
    deadline = time.monotonic() + 300
    while len(list(done.glob("clean-*"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(done.glob("clean-*")))
    assert 3 <= finished < SHARDS, finished
    rerun = _pipeline(corpus[0], target)
    assert rerun.returncode == 0
    assert _tree_bytes(target) == _tree_bytes(out)


@pytest.mark.slow
def test_one_big_file_read_in_byte_ranges_gives_the_same_tokens(corpus, one_worker, tmp_path):
    """The same documents in one file, read by many byte-range tasks: same cleaned text and tokens."""
    out, _ = one_worker
    single = tmp_path / "raw" / "all.jsonl"
    single.parent.mkdir()
    single.write_bytes(b"".join(p.read_bytes() for p in sorted(corpus[0].glob("part-*.jsonl"))))
    target = tmp_path / "ranged"
    _pipeline(single.parent, target, "input.shard_megabytes=0.03", "executor.workers=2", pattern="all.jsonl")
    shards = json.loads((target / "work" / "shards.json").read_text())
    assert len(shards) == -(-single.stat().st_size // 30_000) and all(s[0] == str(single) for s in shards)
    ours, reference = _tree_bytes(target), _tree_bytes(out)
    assert {k: v for k, v in ours.items() if not k.startswith("cleaned")} == \
        {k: v for k, v in reference.items() if not k.startswith("cleaned")}

    def cleaned(files: dict[str, bytes]) -> bytes:
        return b"".join(v for k, v in sorted(files.items()) if k.startswith("cleaned"))

    assert cleaned(ours) == cleaned(reference)


def _slurm_idle(timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True)
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        # Jobs still listed, or a busy controller that did not answer this time: asked again.
        assert time.monotonic() < deadline, "SLURM jobs still queued or running"
        time.sleep(1)


@pytest.mark.slurm
def test_slurm_executor_on_a_real_cluster(corpus, local_slurm, tmp_path):
    """On a one-node SLURM, every stage is submitted at once as sbatch job arrays chained by afterok
    dependencies; with executor.wait=false the command returns at once and the cluster alone runs the
    stages in order and the report, ending with the same bytes as a local run. Three of the eight files
    keep the number of jobs (each a Python start-up) small."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in sorted(corpus[0].glob("part-*.jsonl"))[:3]:
        (raw / path.name).write_bytes(path.read_bytes())
    _pipeline(raw, tmp_path / "local")
    target = tmp_path / "slurm"
    on_slurm = ("executor=slurm", f"executor.partition={local_slurm}", "executor.workers=2", "executor.mem_gb=2")
    submitted = _pipeline(raw, target, *on_slurm, "executor.wait=false")
    assert "submitted, each after the one before: clean" in submitted.stdout
    assert not (target / "blend.json").exists()  # nothing has run yet
    job_ids = json.loads((target / "work" / "slurm" / "submitted.json").read_text())["jobs"]
    assert len(job_ids) == 7  # six stages and the report

    refused = _pipeline(raw, target, *on_slurm, check=False)  # while those jobs are queued or running
    assert refused.returncode == 2 and "still being processed by SLURM jobs" in refused.stderr

    _slurm_idle()
    assert _tree_bytes(target) == _tree_bytes(tmp_path / "local")
    on_cluster, here = (json.loads((folder / "report" / "report.json").read_text())
                        for folder in (target, tmp_path / "local"))
    assert set(on_cluster.pop("stages")) == set(here.pop("stages"))  # timings and memory differ, stages do not
    assert on_cluster == here


@pytest.mark.slurm
def test_a_rerun_that_cannot_ask_slurm_refuses_to_start(local_slurm, tmp_path, monkeypatch):
    """Jobs recorded for this output and a controller that does not answer: no guess, one clear line."""
    config = load_pipeline_config([f"input.paths=[{tmp_path}/*.jsonl]", f"output.dir={tmp_path / 'out'}",
                                   "executor=slurm"])
    record = tmp_path / "out" / "work" / "slurm" / "submitted.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"jobs": ["999999"]}))
    refuse_while_running(config)  # the real controller: job 999999 is not running, so a rerun goes ahead

    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    unreachable = tmp_path / "slurm.conf"  # the same cluster behind a port nothing listens on
    unreachable.write_text(conf + "SlurmctldPort=9\nMessageTimeout=1\nTCPTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(unreachable))
    with pytest.raises(InputError, match="squeue cannot tell whether they still run .*controller"):
        refuse_while_running(config)


@pytest.mark.slurm
def test_a_failed_task_names_itself_and_on_slurm_cancels_the_later_stages(corpus, local_slurm, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-00000.jsonl").write_bytes(sorted(corpus[0].glob("part-*.jsonl"))[0].read_bytes())
    too_big = "tokenizer.vocab_size=200000"  # sentencepiece refuses it for so little text
    local = _pipeline(raw, tmp_path / "local", too_big, check=False)
    assert local.returncode == 1 and "stage tokenizer, task 0 failed" in local.stderr
    assert "Vocabulary size too high" in local.stderr

    target = tmp_path / "slurm"
    failed = _pipeline(raw, target, too_big, "executor=slurm", f"executor.partition={local_slurm}", check=False)
    assert failed.returncode == 1, failed.stderr[-3000:]
    message = failed.stderr[failed.stderr.index("stage tokenizer, task 0 failed on SLURM"):]
    assert "Vocabulary size too high" in message and "log " in message
    _slurm_idle(60)  # tokenize and merge were cancelled by SLURM, not left pending
    done = {path.name.split("-")[0] for path in (target / "work" / "done").iterdir()}
    assert done == {"clean", "dedup", "split"} and not (target / "tokens").exists()


def test_bad_config_and_missing_input_stop_before_work(tmp_path):
    missing = _pipeline(tmp_path / "nowhere", tmp_path / "out", check=False)
    assert missing.returncode == 2 and "matches no file" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and not (tmp_path / "out" / "cleaned").exists()
    bad = _pipeline(tmp_path, tmp_path / "out2", "dedup.bandz=3", check=False)
    assert bad.returncode == 2 and "dedup.bands" in bad.stderr


@pytest.mark.slow
def test_trainer_trains_from_the_pipeline_output(one_worker, tmp_path):
    out, _ = one_worker
    run_dir = tmp_path / "run"
    run_train(["experiment=quickstart", f"run.dir={run_dir}", f"data.blend={out / 'blend.json'}",
               "train.max_steps=6", "train.seq_length=64", "optimizer.warmup_steps=2",
               "logging.wandb.mode=disabled"])
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and np.isfinite(losses).all() and losses[-1] < losses[0]
    # The held-out files the pipeline wrote are evaluated at the end, per language.
    evaluation = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    languages = {entry["lang"] for entry in json.loads((out / "blend.json").read_text())["datasets"]
                 if entry["valid_prefix"]}
    assert evaluation["step"] == 6 and set(evaluation["languages"]) == languages
    assert np.isfinite([values["loss"] for values in evaluation["languages"].values()]).all()
