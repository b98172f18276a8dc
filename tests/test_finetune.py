"""Fine-tuning runs: the loss on targets only, normalised over the global batch under any cut into micro-batches
and any layout, exact resume in the middle of an epoch, early stopping on eval.metric with checkpoints/best
and test.json from it, and the worked NusaX example beating its start and the majority baseline.

The data: NusaX sentiment (shipped with the task suites) in two languages, cut to a few dozen records, as
prompt -> label pairs prepared by ``python -m data_tools.finetune`` with the tokenizer of the session's tiny
pretrained run, which every fine-tuning run here starts from (``checkpoint.init_from``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from bloomtrain.metrics import EVAL_FILE, read_metrics
from tests.conftest import REPO, run_torchrun, run_train, tiny_run

NUSAX = REPO / "bloomtrain" / "harness" / "tasks" / "nusax" / "data" / "sentiment"
LANGUAGES = {"eng": "english", "ind": "indonesian"}
ROWS = {"train": 64, "valid": 16, "test": 16}


@pytest.fixture(scope="module")
def task_data(tmp_path_factory, checkpointed_run) -> Path:
    """blend.json of two small NusaX sentiment tasks, tokenized as the checkpointed run's data."""
    from data_tools.finetune.__main__ import main

    root = tmp_path_factory.mktemp("finetune-data")
    sources = []
    for iso, folder in LANGUAGES.items():
        for split, rows in ROWS.items():
            with (NUSAX / folder / f"{split}.csv").open(newline="") as source:
                records = list(csv.reader(source))[: rows + 1]
            with (root / f"{iso}_{split}.csv").open("w", newline="") as target:
                csv.writer(target).writerows(records)
        sources.append(f"{{name: sentiment_{iso}, train: [{root}/{iso}_train.csv], valid: [{root}/{iso}_valid.csv], "
                       f"test: [{root}/{iso}_test.csv], prompt: 'Text: {{text}}\\nSentiment:', target: ' {{label}}'}}")
    assert main([f"tokenizer.path={checkpointed_run}", f"output.dir={root / 'out'}", "seq_length=128",
                 f"sources=[{','.join(sources)}]"]) == 0
    return root / "out" / "blend.json"


def finetune_run(run_dir: Path, cache: Path, start: Path, blend: Path, *extra: str) -> list[str]:
    return tiny_run(run_dir, cache, "data.kind=finetune", f"data.blend={blend}", f"checkpoint.init_from={start}",
                    "train.seq_length=128", "train.global_batch_size=4", "optimizer.warmup_steps=0",
                    "optimizer.decay_style=constant", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_cache, checkpointed_run, task_data) -> Path:
    """Two epochs in one process, micro-batch 4 (no accumulation)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(finetune_run(run_dir, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=4",
                           "train.epochs=2"))
    return run_dir


def hand_loss(start: Path, blend: Path, rows: range, normalization: str) -> float:
    """The first global batch's target loss computed here from the starting weights: cross entropy at every
    target position, averaged over target tokens (token) or per example, then over examples (example)."""
    from bloomtrain.checkpoint.loading import load_model
    from bloomtrain.config import TrainConfig
    from bloomtrain.data.finetune import build_finetune_data
    from bloomtrain.data.packing import read_finetune_blend

    train = TrainConfig(seq_length=128, global_batch_size=4, micro_batch_size=4, epochs=2,
                        loss_normalization=normalization)
    data = build_finetune_data(read_finetune_blend(blend), train, "best_fit", 0)
    model = load_model(start).model.eval()
    per_example: list[torch.Tensor] = []
    with torch.no_grad():
        for index in rows:
            row = data.train[index]
            logits = model(row["tokens"][None], segments=row["segments"][None])[0, :, :model.config.vocab_size]
            losses = torch.nn.functional.cross_entropy(logits.double(), row["labels"], reduction="none")
            for segment in row["segments"].unique().tolist():
                if segment:
                    targets = (row["segments"] == segment) & (row["loss_mask"] > 0)
                    per_example.append(losses[targets])
    if normalization == "token":
        return torch.cat(per_example).mean().item()
    return torch.stack([losses.mean() for losses in per_example]).mean().item()


def test_the_target_loss_is_a_hand_computation_normalised_over_the_global_batch(
        tmp_path, sample_cache, checkpointed_run, task_data, reference):
    want = read_metrics(reference)
    assert want[0]["loss"] == pytest.approx(hand_loss(checkpointed_run, task_data, range(4), "token"), rel=1e-5)
    # Micro-batch 1 x accumulation 4 trains the same curve as micro-batch 4 x accumulation 1.
    accumulated = tmp_path / "accumulated"
    run_train(finetune_run(accumulated, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=1",
                           "train.max_steps=3"))
    for got, expected in zip(read_metrics(accumulated), want[:3], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), got["step"]
    # What a per-micro-batch mean would give is measurably different: the check above can fail.
    per_micro = sum(hand_loss(checkpointed_run, task_data, range(i, i + 1), "token") for i in range(4)) / 4
    assert abs(per_micro - want[0]["loss"]) > 1e-3 * want[0]["loss"]
    assert 0.9 < want[0]["packing_efficiency"] <= 1.0


@pytest.mark.multiprocess
def test_tensor_pipeline_and_data_parallel_equal_one_process(tmp_path, sample_cache, checkpointed_run, task_data,
                                                              reference):
    layout = tmp_path / "layout"
    run_torchrun(8, finetune_run(layout, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=1",
                                 "train.max_steps=3", "parallel.tensor=2", "parallel.pipeline=2", "parallel.data=2"))
    for got, want in zip(read_metrics(layout), read_metrics(reference)[:3], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]
    # The test split of the last checkpoint, scored under the layout, equals one process's on the same weights.
    test = json.loads((layout / "test.json").read_text())
    assert test["step"] == 3 and test["loss"] > 0


def test_a_run_stopped_in_the_middle_of_an_epoch_resumes_exactly(tmp_path, sample_cache, checkpointed_run, task_data,
                                                                 reference):
    want = read_metrics(reference)
    per_epoch = len(want) // 2
    resumed = tmp_path / "resumed"
    # Stopped halfway through the second epoch (by a step budget), then continued as the reference was started.
    run_train(finetune_run(resumed, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=4",
                           f"train.max_steps={per_epoch + per_epoch // 2}", "checkpoint.interval=0"))
    result = run_train(finetune_run(resumed, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=4",
                                    "train.epochs=2"))
    assert "resumed from" in result.stderr
    got = read_metrics(resumed)
    assert [m["step"] for m in got] == list(range(1, len(want) + 1))
    for mine, theirs in zip(got, want, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=0), mine["step"]
    assert want[-1]["loss"] < want[0]["loss"]


def test_early_stopping_keeps_the_best_checkpoint_and_scores_the_test_split_with_it(
        tmp_path, sample_cache, checkpointed_run, task_data):
    from data_tools.sample import prepare_sample

    run_dir = tmp_path / "stopping"
    # A learning rate too high to settle: the validation loss falls for some steps, then rises for good.
    # The starting model's pretraining data is validated too (does it forget?).
    result = run_train(finetune_run(run_dir, sample_cache, checkpointed_run, task_data, "train.micro_batch_size=4",
                                    "train.max_steps=30", "optimizer.lr=0.01", "optimizer.min_lr=0.01",
                                    "eval.interval=1", "eval.iters=2", "eval.early_stop_patience=3",
                                    "checkpoint.interval=0", "checkpoint.keep=1", "train.loss_normalization=example",
                                    f"eval.pretraining_blend={prepare_sample(sample_cache)}"))
    steps = read_metrics(run_dir)
    evaluations = read_metrics(run_dir, EVAL_FILE)
    assert all(m["nonfinite_steps"] == 0 for m in steps)  # stopped by the metric, not by skipped steps
    assert set(evaluations[0]["languages"]) == {"sentiment_eng", "sentiment_ind"}
    forgetting = [row["pretraining"]["loss"] for row in evaluations]
    assert len(evaluations[0]["pretraining"]["languages"]) > 5 and forgetting[-1] > forgetting[0]
    best = min(evaluations, key=lambda row: row["loss"])
    assert 1 < best["step"] and len(steps) == best["step"] + 3 < 30 and "stopped early" in result.stdout + result.stderr
    assert json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["progress"]["step"] == best["step"]
    assert not (run_dir / "checkpoints" / f"step_{best['step']}").exists()  # pruned; best outlives it
    test = json.loads((run_dir / "test.json").read_text())
    assert test["step"] == best["step"] and test["metric_value"] == pytest.approx(best["loss"])
    # Per-example normalisation, by hand, on the first global batch.
    assert steps[0]["loss"] == pytest.approx(hand_loss(checkpointed_run, task_data, range(4), "example"), rel=1e-5)
    # test.json's loss is the best checkpoint's, computed again here over the whole test split.
    checkpoints = run_dir / "checkpoints"
    assert test["loss"] == pytest.approx(unpacked_test_loss(checkpoints / "best", task_data), rel=1e-5)
    assert test["loss"] != pytest.approx(unpacked_test_loss(checkpoints / f"step_{len(steps)}", task_data), rel=1e-3)
    start = json.loads((run_dir / "test_start.json").read_text())
    assert start["loss"] == pytest.approx(unpacked_test_loss(checkpointed_run, task_data), rel=1e-5)


def unpacked_test_loss(checkpoint: Path, blend: Path) -> float:
    """Mean cross entropy over every target token of every test example, one example at a time, unpacked."""
    from bloomtrain.checkpoint.loading import load_model
    from bloomtrain.data.packing import load_examples, read_finetune_blend

    model = load_model(checkpoint).model.eval()
    examples, _ = load_examples(read_finetune_blend(blend), "test")
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask in examples:
            tokens = torch.from_numpy(tokens)
            logits = model(tokens[None, :-1])[0, :, :model.config.vocab_size].double()
            losses = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="none")
            targets = torch.from_numpy(mask[1:]) > 0
            total, count = total + losses[targets].sum().item(), count + int(targets.sum())
    return total / count


@pytest.mark.slow
def test_the_worked_nusax_example_beats_its_start_and_the_majority_baseline(tmp_path, sample_cache, checkpointed_run):
    """The README's example, sized down: all twelve languages of the vendored data, 64 steps (half an
    epoch: 0.61 macro-F1 against 0.64 after a whole one), the task scores on the first 40 documents of each
    split, validation once, after the last step."""
    from data_tools.finetune.__main__ import main

    data = tmp_path / "nusax"
    assert main(["preset=nusax_sentiment", f"tokenizer.path={checkpointed_run}", f"output.dir={data}",
                 "seq_length=256"]) == 0
    start = tmp_path / "start"
    shutil.copytree(checkpointed_run, start)
    run_dir = tmp_path / "run"
    result = run_train(["experiment=finetune-quickstart", f"run.dir={run_dir}", f"data.blend={data / 'blend.json'}",
                        f"checkpoint.init_from={start}", "train.epochs=null", "train.max_steps=64",
                        "eval.interval=1000", "eval.tasks_limit=40", "logging.wandb.mode=disabled",
                        "logging.tensorboard=false", "train.peak_tflops=1"])
    before = json.loads((run_dir / "test_start.json").read_text())["tasks"]
    test = json.loads((run_dir / "test.json").read_text())
    after, baseline = test["tasks"], majority_baseline(40)
    assert test["majority_baseline"]["nusax_sentiment/f1"] == pytest.approx(baseline)
    print(f"\nNusaX sentiment test macro-F1 (first 40 per language): start {before['nusax_sentiment/f1']:.3f}, "
          f"fine-tuned {after['nusax_sentiment/f1']:.3f}, majority {baseline:.3f}")
    assert after["nusax_sentiment/f1"] > max(before["nusax_sentiment/f1"], baseline) + 0.1
    assert "test split" in result.stdout
    # lm-eval's progress bars and INFO/WARNING lines inside the run went to the log, not the terminal.
    terminal = result.stdout + result.stderr
    assert "Tokenizing inputs" not in terminal and "lm_eval" not in terminal and "it/s]" not in terminal
    assert "Tokenizing inputs" in (run_dir / "logs" / "rank-0.log").read_text()


def majority_baseline(limit: int) -> float:
    """Mean over languages of the macro-F1 of always answering the language's most frequent training label,
    on the first ``limit`` test documents."""
    import sys

    sys.path.insert(0, str(NUSAX.parent.parent))
    from nusax import LABELS, macro_f1  # the task suite's own metric

    scores = []
    for folder in sorted(path.name for path in NUSAX.iterdir()):
        with (NUSAX / folder / "train.csv").open(newline="") as handle:
            labels = [row["label"] for row in csv.DictReader(handle)]
        majority = LABELS.index(max(set(labels), key=labels.count))
        with (NUSAX / folder / "test.csv").open(newline="") as handle:
            gold = [LABELS.index(row["label"]) for row in list(csv.DictReader(handle))[:limit]]
        scores.append(macro_f1([(truth, majority) for truth in gold]))
    return sum(scores) / len(scores)
