"""The pipeline on the second bundled real corpus (Debian's translation catalogs: 18 locales, Chinese,
Japanese and Korean, messy lines, natural duplicates) with default keys only: it completes, its
per-language report adds up and its fertility is what the token files say, the charts are drawn, W&B
gets the report, and the blend trains."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, read_wandb_history, run_train

CORPUS = REPO / "data_tools" / "samples" / "gettext_sample.jsonl.gz"


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gettext") / "out"
    result = subprocess.run([sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{CORPUS}]",
                             f"output.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_the_corpus_is_real_multilingual_text_with_what_makes_it_hard():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    characters = Counter("".join(r["text"] for r in records))
    assert len(records) > 2000 and len({r["locale"] for r in records}) == 18
    assert len(characters) > 3000  # CJK: thousands of distinct characters
    assert len(records) - len({r["text"] for r in records}) > 100  # natural exact duplicates
    assert all(r["source"].startswith("debian:") for r in records)
    provenance = json.loads((CORPUS.parent / "gettext_sample.provenance.json").read_text())
    assert {r["source"].split()[0].removeprefix("debian:") for r in records} == \
        {entry["package"] for entry in provenance.values()}


@pytest.mark.slow
def test_defaults_complete_with_one_line_per_language_and_no_library_noise(defaults_run):
    out, result = defaults_run
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    table = result.stdout
    for language in ("zh", "ja", "de", "ru", "ar"):
        assert any(line.startswith(f"{language} ") for line in table.splitlines()), table
    assert "character coverage" in table and "peak" in table
    blend = json.loads((out / "blend.json").read_text())
    assert {"zh", "ja", "ru", "de", "vi"} <= {entry["lang"] for entry in blend["datasets"]}


@pytest.mark.slow
def test_per_language_accounting_adds_up_and_fertility_matches_the_token_files(defaults_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_tools.tokenizer_training import BYTE_PIECES, SPECIAL_IDS

    out, _ = defaults_run
    report = json.loads((out / "report" / "report.json").read_text())
    steps = {step["step"]: step for step in report["steps"]}
    languages = report["languages"]
    for step_name in ("language_id", "quality", "pii", "dedup"):
        step = steps[step_name]
        assert sum(entry["funnel"][[r["step"] for r in entry["funnel"]].index(step_name)]["documents"]
                   for entry in languages.values()) == sum(c["documents"] for c in step["out"].values())
        for reason, by_language in step["dropped"].items():
            assert sum(entry["dropped"].get(f"{step_name}: {reason}", 0) for entry in languages.values()) == \
                sum(by_language.values())
    for entry in languages.values():
        kept = [row["documents"] for row in entry["funnel"]]
        assert kept == sorted(kept, reverse=True)  # a funnel never grows
    assert steps["dedup"]["dropped"]["exact_duplicate"]  # the catalogs' natural duplicates were found

    cleaned = [json.loads(line) for line in (out / "cleaned" / "00000.jsonl").read_text().splitlines()]
    for language in ("de", "zh"):
        texts = [r["text"] for r in cleaned if r["lang"] == language]
        tokens = sum(len(IndexedDataset(str(out / folder / language))[i])
                     for folder in ("tokens", "tokens/valid")
                     for i in range(len(IndexedDataset(str(out / folder / language)))))
        content = tokens - len(texts)  # one EOS a document
        fertility = languages[language]["fertility"]
        assert fertility["tokens_per_word"] == pytest.approx(content / sum(len(t.split()) for t in texts), abs=1e-4)
        assert fertility["tokens_per_character"] == pytest.approx(content / sum(len(t) for t in texts), abs=1e-4)
        assert languages[language]["tokens"]["train"] == \
            next(e["tokens"] for e in json.loads((out / "blend.json").read_text())["datasets"] if e["lang"] == language)
    assert languages["zh"]["fertility"]["unit"] == "tokens per character"
    assert languages["de"]["fertility"]["unit"] == "tokens per word"

    chosen = report["tokenizer"]
    room = (chosen["vocab_size"] - len(SPECIAL_IDS) - BYTE_PIECES) // 2
    assert chosen["distinct_characters"] > 2000 and chosen["characters_as_pieces"] <= room
    for stage in ("clean", "dedup", "split", "tokenizer", "tokenize", "merge"):
        assert report["stages"][stage]["peak_rss_mb"] > 10 and report["stages"][stage]["task_seconds"] >= 0
    assert report["stages"]["clean"]["mb_per_second"] > 0


@pytest.mark.slow
def test_charts_are_drawn_from_the_report(defaults_run):
    import matplotlib.image

    out, _ = defaults_run
    for name in ("funnel", "tokens"):
        image = matplotlib.image.imread(out / "report" / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_report_goes_to_wandb_when_it_is_on(defaults_run):
    from data_tools.pipeline.config import load_pipeline_config
    from data_tools.pipeline.report import write_report

    out, _ = defaults_run
    config = load_pipeline_config([f"input.paths=[{CORPUS}]", f"output.dir={out}", "wandb.mode=offline"])
    report = write_report(config, 1)
    # In-process, W&B's service writes its transaction log after ``finish()`` returns (seen: 7 bytes
    # right after it, the whole log a moment later); a user's process flushes it at exit.
    deadline = time.monotonic() + 60
    while not (rows := read_wandb_history(out / "report")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rows and rows[0]["languages/_type"] == "table-file"
    assert rows[0]["languages/nrows"] == len(report["languages"])
    assert rows[0]["chart/funnel/_type"] == rows[0]["chart/tokens/_type"] == "image-file"
    media = list((out / "report" / "wandb").glob("offline-run-*/files/media/table/languages_*.table.json"))
    table = json.loads(media[0].read_text())
    assert {row[0] for row in table["data"]} == set(report["languages"])


@pytest.mark.slow
def test_the_blend_trains(defaults_run, tmp_path):
    out, _ = defaults_run
    run_dir = tmp_path / "run"
    run_train(["experiment=quickstart", f"run.dir={run_dir}", f"data.blend={out / 'blend.json'}",
               "train.max_steps=4", "train.seq_length=64", "optimizer.warmup_steps=1", "eval.iters=1",
               "logging.wandb.mode=disabled"])
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and np.isfinite(losses).all()
    evaluation = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert {"zh", "ja", "de"} <= set(evaluation["languages"])
