"""Training end to end through ``python -m bloomtrain.train``: the run directory, resume, user errors, the quickstart
(half precision is pinned against fp32 in test_parallel.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from bloomtrain.data.blend import read_blend
from bloomtrain.metrics import EVAL_FILE, read_metrics
from tests.conftest import REPO, copy_run, read_wandb_history, run_torchrun, run_train, tiny_run

pytestmark = pytest.mark.slow  # every test here trains (the quickstart with two processes)

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "consumed_samples"}


def test_restart_resumes_from_latest(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    wandb = "logging.wandb.mode=offline"
    run_train(tiny_run(run_dir, sample_cache, "train.max_steps=6", "optimizer.decay_steps=10", wandb))
    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=10", "optimizer.decay_steps=10", wandb))
    assert "resumed from" in result.stderr and "step_6" in result.stderr

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[6]["consumed_samples"] == 7 * 16
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    meta = json.loads((run_dir / "checkpoints" / "step_10" / "meta.json").read_text())
    run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert run_ids == {meta["progress"]["wandb_run_id"]}  # both sessions logged to one W&B run


def test_evaluation_is_logged_everywhere_and_consistent_across_a_resume(tmp_path, sample_cache):
    """Per-language validation every 3 steps: eval.jsonl, TensorBoard (read back with its own reader) and the
    offline W&B run; a run stopped at step 3 and resumed evaluates to the same numbers as one that was not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("train.max_steps=6", "optimizer.decay_steps=6", "eval.interval=3", "eval.iters=1",
              "logging.tensorboard=true", "logging.wandb.mode=offline")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tiny_run(straight, sample_cache, *common, "logging.wandb.mode=disabled"))
    run_train(tiny_run(resumed, sample_cache, *common[1:], "train.max_steps=3"))
    result = run_train(tiny_run(resumed, sample_cache, *common))
    assert "resumed from" in result.stderr

    want, got = read_metrics(straight, EVAL_FILE), read_metrics(resumed, EVAL_FILE)
    assert [e["step"] for e in got] == [e["step"] for e in want] == [3, 6]
    languages = {entry.lang for entry in read_blend(next(sample_cache.glob("sample-*/blend.json"))).datasets}
    for before, after in zip(want, got, strict=True):
        assert set(after["languages"]) == languages and after["loss"] == pytest.approx(before["loss"], rel=1e-6)
        for language, values in after["languages"].items():
            assert values["loss"] == pytest.approx(before["languages"][language]["loss"], rel=1e-6)
            assert values["perplexity"] == pytest.approx(math.exp(values["loss"]))
            assert values["tokens"] == 16 * 64
    assert got[-1]["loss"] < got[0]["loss"]
    assert "validation" in result.stdout and "valid en" in result.stdout  # the closing summary

    events = EventAccumulator(str(resumed / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("valid/loss")] == [3, 6]  # no step twice after the resume
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 7))
    assert events.Scalars("valid/en/loss")[-1].value == pytest.approx(got[-1]["languages"]["en"]["loss"])

    history = read_wandb_history(resumed)  # both sessions, from W&B's own offline files
    assert [row["_step"] for row in history] == list(range(1, 7))
    evaluated = {row["_step"]: row for row in history if "valid/loss" in row}
    assert sorted(evaluated) == [3, 6] and evaluated[6]["valid/loss"] == pytest.approx(got[-1]["loss"])
    assert {f"valid/{language}/perplexity" for language in languages} <= set(evaluated[6])

    # The standalone evaluator, on the run directory, reads the same samples: the same numbers.
    standalone = subprocess.run([sys.executable, "-m", "bloomtrain.evaluate", str(straight), "--json", "-"],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    evaluation = json.loads(standalone.stdout)
    assert evaluation["loss"] == pytest.approx(want[-1]["loss"], rel=1e-5)
    for language, values in want[-1]["languages"].items():
        assert evaluation["languages"][language]["loss"] == pytest.approx(values["loss"], rel=1e-5), language
    # Exported to Hugging Face: scored over the real vocabulary only, so close to, not equal to, the run's.
    subprocess.run([sys.executable, "-m", "bloomtrain.convert", "to-hf", str(straight), str(tmp_path / "hf")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    blend = next(sample_cache.glob("sample-*/blend.json"))
    hf = subprocess.run([sys.executable, "-m", "bloomtrain.evaluate", str(tmp_path / "hf"), f"data.blend={blend}",
                         "train.seq_length=64", "eval.iters=1", f"data.cache_dir={sample_cache}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert hf.returncode == 0, hf.stderr[-3000:]
    overall = float(hf.stdout.strip().splitlines()[-1].split()[1])
    assert overall == pytest.approx(want[-1]["loss"], rel=1e-2)


def test_early_stopping_on_validation_loss(tmp_path, sample_cache):
    """Too high a learning rate (every step finite, none skipped) makes validation loss rise: the run stops at
    the first evaluation that does not beat the best so far (patience 1), with a checkpoint there."""
    run_dir = tmp_path / "run"
    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=12", "optimizer.lr=0.3", "optimizer.min_lr=0.3",
                             "eval.interval=2", "eval.iters=1", "eval.early_stop_patience=1"))
    assert all(m["nonfinite_steps"] == 0 and math.isfinite(m["loss"]) for m in read_metrics(run_dir))
    losses = [e["loss"] for e in read_metrics(run_dir, EVAL_FILE)]
    stop = len(losses) - 1  # the evaluation the run stopped after
    assert stop >= 1 and all(losses[i] < min(losses[:i]) for i in range(1, stop))  # improving until then
    assert losses[stop] >= min(losses[:stop])
    step = 2 * (stop + 1)
    assert step < 12 and f"stopped early after step {step}" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    meta = json.loads((run_dir / "checkpoints" / f"step_{step}" / "meta.json").read_text())
    assert meta["progress"]["evals_without_improvement"] == 1
    assert meta["progress"]["best_valid_loss"] == pytest.approx(min(losses[:stop]))


def test_resume_refuses_a_different_model(tmp_path, sample_cache, checkpointed_run):
    run_dir = copy_run(checkpointed_run, tmp_path / "run")
    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=6", "model.num_layers=2"), check=False)
    assert result.returncode == 2
    assert "model.num_layers=4 but the config says model.num_layers=2" in result.stderr


def test_user_errors_are_one_line(tmp_path, sample_cache):
    missing = run_train(tiny_run(tmp_path / "a", sample_cache, f"data.blend={tmp_path}/none.json"), check=False)
    assert missing.returncode == 2 and "data.blend=" in missing.stderr and "Traceback" not in missing.stderr
    small = run_train(tiny_run(tmp_path / "b", sample_cache, "model.vocab_size=1000"), check=False)
    assert small.returncode == 2 and "set model.vocab_size>=4096" in small.stderr


LIBRARY_NOISE = ("Warning:", "[WARNING]", "warnings.warn", "DeepSpeed", "megatron", "Transformer Engine",
                 "return func(", "deprecated")


def test_quickstart_command(tmp_path, sample_cache):
    """The README's quickstart, as a user runs it: two ranks through the launcher, MFU against the peak
    measured at start-up, every file of the run directory, loss down by 30% and validation falling in
    every language, and a terminal free of library notices (they are in RUN_DIR/logs)."""
    run_dir = tmp_path / "quickstart"
    env = {**os.environ, "BLOOMTRAIN_RUN_DIR": str(run_dir)}
    result = subprocess.run(["bash", str(REPO / "launch" / "quickstart.sh"), f"data.cache_dir={sample_cache}"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    noise = [line for line in terminal.splitlines() if any(mark in line for mark in LIBRARY_NOISE)]
    assert not noise, noise
    logged = "".join(path.read_text() for path in (run_dir / "logs").glob("rank-*.log"))
    assert "Setting accelerator to CPU" in logged and "Transformer Engine and Apex" in logged

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 300 and saved["run"]["dir"] == str(run_dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 301)) and all(METRIC_KEYS <= set(m) for m in metrics)
    assert metrics[-1]["loss"] <= 0.7 * metrics[0]["loss"]
    assert all(m["tokens_per_s"] > 0 and 0 < m["mfu"] == m["hfu"] <= 1 for m in metrics)  # never over 100%
    assert "MFU's peak: measured" in result.stderr
    last = metrics[-1]
    assert last["consumed_samples"] == 300 * 16 and last["samples_per_s"] * 128 == pytest.approx(last["tokens_per_s"])
    assert last["param_norm"] > 0 and last["peak_memory_gb"] > 0
    assert last["data_wait_s"] + last["compute_s"] > last["optimizer_s"] > 0
    assert last["loss_scale"] is None and last["skipped_steps"] is None  # fp32
    per_language = {key: value for key, value in last.items() if key.startswith("tokens/")}
    assert len(per_language) == 16 and sum(per_language.values()) == last["consumed_tokens"] == 300 * 16 * 128

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_300"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_200", "step_300"]  # keep=2
    assert {p.name for p in (checkpoints / "step_300").iterdir()} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "meta.json", "manifest.json", "config.yaml", "tokenizer"}
    assert {p.name for p in (checkpoints / "step_300" / "tokenizer").iterdir()} == {
        "tokenizer.model", "tokenizer_metadata.json"}  # the run's tokenizer, in the manifest too
    assert "tokenizer/tokenizer.model" in json.loads((checkpoints / "step_300" / "manifest.json").read_text())["files"]
    meta = json.loads((checkpoints / "step_300" / "meta.json").read_text())
    assert meta["progress"]["consumed_tokens"] == 300 * 16 * 128 and meta["layout"]["zero_stage"] == 1
    assert yaml.safe_load(meta["config"])["train"]["max_steps"] == 300 and "git_commit" in meta
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))
    for label in ("run directory", "checkpoint", "W&B files"):
        assert label in result.stdout
    assert str(wandb_runs[0]) in result.stdout and str(checkpoints / "step_300") in result.stdout

    # Validation every 100 steps on each language's held-out articles: falling for every language, and
    # shown in the closing summary and the report.
    evaluations = read_metrics(run_dir, EVAL_FILE)
    assert [e["step"] for e in evaluations] == [100, 200, 300]
    first, last_eval = evaluations[0]["languages"], evaluations[-1]["languages"]
    assert len(last_eval) == 16 and all(last_eval[language]["loss"] < first[language]["loss"] for language in last_eval)
    assert "valid en" in result.stdout and "valid zh" in result.stdout
    report = json.loads((run_dir / "report" / "summary.json").read_text())
    assert report["last_valid_loss"] == pytest.approx(evaluations[-1]["loss"])
    assert "| zh |" in (run_dir / "report" / "summary.md").read_text()
    assert (run_dir / "report" / "curves.png").exists() and list((run_dir / "tensorboard").glob("events.*"))


def test_compiled_blocks_train_as_the_eager_ones_do(tmp_path, sample_cache):
    """``train.compile=true``: torch.compile really made graphs of the blocks, and the losses are eager mode's
    to rounding (inductor fuses the elementwise work)."""
    common = ("train.max_steps=4", "checkpoint.interval=0")
    run_torchrun(1, [str(tmp_path / "eager-report"), *tiny_run(tmp_path / "eager", sample_cache, *common)],
                 module="tests.distributed_checks")
    run_torchrun(1, [str(tmp_path / "report"), *tiny_run(tmp_path / "compiled", sample_cache, *common,
                                                       "train.compile=true")], module="tests.distributed_checks")
    assert json.loads((tmp_path / "eager-report" / "rank_0.json").read_text())["compiled_graphs"] == 0
    assert json.loads((tmp_path / "report" / "rank_0.json").read_text())["compiled_graphs"] > 0
    eager, compiled = ([m["loss"] for m in read_metrics(tmp_path / name)] for name in ("eager", "compiled"))
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4)
