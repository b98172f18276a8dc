"""``python -m data_tools.finetune``: records of every format to token files with a loss mask, the
prompt/target boundary checked, bad records counted by reason, splits kept apart."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bloomtrain.data.tokenizer import TokenEncoder
from data_tools.finetune.__main__ import main
from tests.conftest import save_byte_level_bpe

WORDS = ["The rights of everyone are equal.", "Translate to French: good morning", "bonjour", "positive",
         "negative", "neutral", "Hello there, how are you?", "I am fine, thank you.", "What is two and two?",
         "Four.", "Sentiment:", "Text: the food was great", "User: Assistant:", "It was positive"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE (BLOOM's kind: a leading space is part of the next word's token)."""
    return save_byte_level_bpe(WORDS * 30, 400, tmp_path_factory.mktemp("bpe"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records))
    return path


def run(tmp_path: Path, tokenizer: Path, *sources: str, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "out"
    assert main([f"tokenizer.path={tokenizer}", f"output.dir={out}", f"sources=[{','.join(sources)}]", *extra]) == 0
    return json.loads((out / "blend.json").read_text())


def examples(out: Path, split_entry: dict) -> list[tuple[list[int], list[int]]]:
    tokens = IndexedDataset(str(out / split_entry["prefix"]))
    mask = IndexedDataset(str(out / split_entry["loss_mask"]))
    return [(tokens[i].tolist(), mask[i].tolist()) for i in range(len(tokens))]


def test_each_format_masks_exactly_the_answers(tmp_path, bpe):
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"inputs": "Translate to French: good morning", "targets": " bonjour"},
        {"prompt": "What is two and two?", "response": " Four."},
        {"messages": [{"role": "user", "content": "Hello there, how are you?"},
                      {"role": "assistant", "content": "I am fine, thank you."},
                      {"role": "user", "content": "What is two and two?"},
                      {"role": "assistant", "content": "Four."}]},
    ])
    table = tmp_path / "labelled.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text", "label"], ["the food was great", "positive"]])
    blend = run(tmp_path, bpe, f"{{name: mixed, train: [{data}], valid: [{data}], test: [{data}]}}",
                f"{{name: labelled, train: [{table}], valid: [{table}], test: [{table}], "
                "prompt: 'Text: {text}\\nSentiment:', target: ' {label}'}")
    assert blend["kind"] == "finetune" and [d["name"] for d in blend["datasets"]] == ["mixed", "labelled"]
    encoder = TokenEncoder(tmp_path / "out" / "tokenizer")
    eos = encoder.eos_id

    def answers(tokens, mask):
        """The masked tokens as text, one string per run of ones (each run ends with the EOS)."""
        runs, current = [], []
        for token, weight in zip(tokens, mask, strict=True):
            if weight:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs.append(current)
        assert all(run[-1] == eos for run in runs)
        return [encoder.decode(run[:-1]) for run in runs]

    got = examples(tmp_path / "out", blend["datasets"][0]["train"])
    assert [answers(*example) for example in got] == [[" bonjour"], [" Four."], ["I am fine, thank you.", "Four."]]
    assert encoder.decode(got[0][0][:-1]) == "Translate to French: good morning bonjour"
    assert encoder.decode(got[2][0]).startswith("User: Hello there, how are you?\nAssistant: I am fine")
    (tokens, mask), = examples(tmp_path / "out", blend["datasets"][1]["test"])
    assert answers(tokens, mask) == [" positive"] and encoder.decode(tokens[:-1]).startswith("Text: the food")
    entry = blend["datasets"][0]["train"]
    assert entry["examples"] == 3 and entry["target_tokens"] == sum(sum(m) for _, m in got)


def test_bad_records_are_counted_by_reason_and_never_mis_masked(tmp_path, bpe):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"inputs": "What is two and two?", "targets": " Four."},          # kept
        {"inputs": "What is two and two?"},                               # missing_field
        {"prompt": "What is two and two?", "response": "   "},            # empty_target
        {"inputs": "The rights of everyone are equal. " * 30, "targets": " Four."},  # too_long
        "{not json",                                                      # unreadable
        {"text": "no known fields"},                                      # missing_field
        {"messages": [{"role": "user", "content": "Hello"}]},             # empty_target (no answer)
    ])
    # A prompt ending in a space before a word: byte-level BPE makes " positive" one token across the
    # boundary, so the prompt's tokens are not a prefix of the whole's.
    shifted = write_jsonl(tmp_path / "shift.jsonl", [{"text": "the food was great", "label": "positive"}])
    out = tmp_path / "out"
    assert main([f"tokenizer.path={bpe}", f"output.dir={out}", "seq_length=64",
                 f"sources=[{{name: bad, train: [{data}], valid: [{data}], test: [{data}]}},"
                 f"{{name: shift, train: [{shifted}], valid: [{shifted}], test: [{shifted}], "
                 "prompt: 'Text: {text} Sentiment: ', target: '{label}'}]"]) == 0
    report = json.loads((out / "report.json").read_text())["sources"]
    assert report["bad"]["read"] == 21 and report["bad"]["kept"] == {"train": 1, "valid": 1, "test": 1}
    assert report["bad"]["skipped"] == {"missing_field": 6, "empty_target": 6, "too_long": 3, "unreadable": 3}
    assert report["shift"]["skipped"] == {"boundary_shift": 3} and report["shift"]["kept"]["train"] == 0
    assert "merge" in report["shift"]["example_of_skipped"]["boundary_shift"]


def test_splits_given_are_kept_and_held_out_ones_are_disjoint_and_repeatable(tmp_path, bpe):
    rows = [{"inputs": f"What is {i} and {i}?", "targets": f" {2 * i}."} for i in range(400)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    source = f"{{name: many, train: [{data}]}}"
    first = run(tmp_path / "a", bpe, source, extra=("split.valid_fraction=0.1", "split.test_fraction=0.2"))
    # The same source given by the input.* keys, its format named.
    assert main([f"tokenizer.path={bpe}", f"output.dir={tmp_path / 'b' / 'out'}", f"input.paths=[{data}]",
                 "input.format=inputs_targets", "input.name=many", "split.valid_fraction=0.1",
                 "split.test_fraction=0.2"]) == 0
    again = json.loads((tmp_path / "b" / "out" / "blend.json").read_text())
    counts = {split: first["datasets"][0][split]["examples"] for split in ("train", "valid", "test")}
    assert counts == {split: again["datasets"][0][split]["examples"] for split in counts}
    assert sum(counts.values()) == 400 and 20 <= counts["valid"] <= 60 and 50 <= counts["test"] <= 110
    seen = [tuple(tokens) for split in ("train", "valid", "test")
            for tokens, _ in examples(tmp_path / "a" / "out", first["datasets"][0][split])]
    assert len(set(seen)) == 400  # every record in exactly one split
    # Records not in the named format are counted, not guessed at.
    assert main([f"tokenizer.path={bpe}", f"output.dir={tmp_path / 'c'}", f"input.paths=[{data}]",
                 "input.format=prompt_response"]) == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["sources"]["task"]["skipped"] == {
        "missing_field": 400}


def test_the_nusax_preset_and_one_line_errors(tmp_path, sample_cache, capsys):
    tokenizer = next(sample_cache.glob("sample-*/tokenizer/tokenizer.model"))
    out = tmp_path / "nusax"
    assert main(["preset=nusax_sentiment", f"tokenizer.path={tokenizer}", f"output.dir={out}", "seq_length=256"]) == 0
    blend = json.loads((out / "blend.json").read_text())
    assert len(blend["datasets"]) == 12 and blend["seq_length"] == 256
    report = json.loads((out / "report.json").read_text())["sources"]["nusax_sentiment_eng"]
    english = next(d for d in blend["datasets"] if d["name"] == "nusax_sentiment_eng")
    kept = [english[split]["examples"] for split in ("train", "valid", "test")]
    assert report["read"] == 1000 and sum(kept) + sum(report["skipped"].values()) == 1000  # NusaX's 500/100/400
    assert kept[1:] == [100, 400] and 495 <= kept[0] <= 500 and set(report["skipped"]) <= {"too_long"}
    assert "nusax_sentiment_eng" in capsys.readouterr().out
    from bloomtrain.config import ConfigError, DataConfig
    from bloomtrain.data.blend import resolve_blend

    # A blend of the other kind is one line naming the key to set, both ways.
    with pytest.raises(ConfigError, match="holds fine-tuning data .* set data.kind=finetune"):
        resolve_blend(DataConfig(blend=str(out / "blend.json")), is_main=True)
    pretraining = tmp_path / "pretraining.json"
    pretraining.write_text(json.dumps({"tokenizer": "t.model", "datasets": [{"prefix": "tokens/en", "weight": 1}]}))
    with pytest.raises(ConfigError, match="holds pretraining text, not fine-tuning data"):
        resolve_blend(DataConfig(kind="finetune", blend=str(pretraining)), is_main=True)
    assert resolve_blend(DataConfig(kind="finetune", blend=str(out / "blend.json")), is_main=True).seq_length == 256
    for args, expected in [(["preset=nusax_sentiment", f"output.dir={out}"], "tokenizer.path is not set"),
                           ([f"tokenizer.path={tokenizer}", f"output.dir={out}"], "no data: give input.paths"),
                           ([f"tokenizer.path={tokenizer}", f"output.dir={out}",
                             "sources=[{name: x, train: [nope/*.csv]}]"],
                            "no file matches nope/*.csv")]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


# ----------------------------------------------------------------------------------- packing


def test_packing_places_every_example_once_and_best_fit_needs_fewest_rows():
    import numpy as np

    from bloomtrain.data.packing import pack_rows

    lengths = np.random.default_rng(0).integers(1, 60, size=500)
    packed = {method: pack_rows(lengths, 64, method) for method in ("best_fit", "greedy")}
    for rows in packed.values():
        assert sorted(i for row in rows for i in row) == list(range(500))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(packed["best_fit"]) < len(packed["greedy"])
    assert len(packed["best_fit"]) <= math.ceil(lengths.sum() / 64) * 1.05  # near the lower bound
    assert [i for row in packed["greedy"] for i in row] == list(range(500))  # greedy keeps the order
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(np.array([65]), 64)


def test_packed_rows_keep_examples_whole_apart_and_seeded():
    import numpy as np

    from bloomtrain.data.packing import PackedExamples

    rng = np.random.default_rng(1)
    examples = []
    for index in range(40):
        length = int(rng.integers(3, 20))
        tokens = np.arange(length, dtype=np.int64) + 100 * index
        mask = (np.arange(length) >= length // 2).astype(np.uint8)
        examples.append((tokens, mask))
    owners = [0] * 20 + [1] * 20
    data = PackedExamples(examples, [1.0, 2.0], owners, seq_length=32, epochs=2, seed=5)
    again = PackedExamples(examples, [1.0, 2.0], owners, seq_length=32, epochs=2, seed=5)
    assert data.rows == again.rows and data.rows[: data.epoch_starts[1]] != data.rows[data.epoch_starts[1]:]
    for epoch_rows in (data.rows[: data.epoch_starts[1]], data.rows[data.epoch_starts[1]:]):
        seen = sorted(i for row in epoch_rows for i in row)
        assert seen == sorted(list(range(20)) + [i for i in range(20, 40) for _ in range(2)])  # weight 2: twice
    assert 0.5 < data.efficiency() <= 1.0
    for index in range(len(data)):
        row = data[index]
        segments = row["segments"].tolist()
        start = 0
        for segment, example in enumerate(data.rows[index], 1):
            tokens, mask = examples[example]
            end = start + len(tokens) - 1
            assert segments[start:end] == [segment] * (end - start)  # one example, whole, contiguous
            assert row["tokens"][start:end].tolist() == tokens[:-1].tolist()
            assert row["labels"][start:end].tolist() == tokens[1:].tolist()  # shifted within the example
            assert row["loss_mask"][start:end].tolist() == mask[1:].tolist()
            start = end
        assert set(segments[start:]) <= {0} and not row["loss_mask"][start:].any()  # padding: no loss


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes,layout", [(1, []), (2, ["parallel.tensor=2"]), (3, ["parallel.pipeline=3"])],
                         ids=["single", "tensor2", "pipeline3"])
def test_packed_examples_do_not_see_each_other(tmp_path, sample_cache, processes, layout):
    """Changing one example's tokens leaves every other example of its row bit-identical (the middle of
    three pipeline stages included); each example scores as it does alone; without the segments the
    examples after the first would see the ones before them."""
    from tests.conftest import run_torchrun, tiny_run

    out = tmp_path / "scores.json"
    run_torchrun(processes, [str(out), *tiny_run(tmp_path / "run", sample_cache, *layout)],
                 module="tests.packing_checks")
    result = json.loads(out.read_text())
    for row, spans in enumerate(result["spans"]):
        order = range(4) if row == 0 else reversed(range(4))
        for (start, end), example in zip(spans, order, strict=True):
            packed, changed = result["packed"][row][start:end], result["changed"][row][start:end]
            if example == 1:
                assert packed != changed
            else:
                assert packed == changed, (row, example)  # bit-identical
            assert packed == pytest.approx(result["alone"][example], rel=1e-5, abs=1e-6)
    start, end = result["spans"][0][3]
    assert result["unmasked"][0][start:end] != pytest.approx(result["alone"][3], rel=1e-3)
