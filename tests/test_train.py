"""Training end to end through ``python -m bloomtrain.train``: the run directory, resume, user errors, the quickstart
(half precision is pinned against fp32 in test_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bloomtrain.metrics import read_metrics
from tests.conftest import REPO, run_train

pytestmark = pytest.mark.slow  # every test here trains (the quickstart with two processes)

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "consumed_samples"}


def _tiny(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["experiment=quickstart", f"run.dir={run_dir}", f"data.cache_dir={cache}", "train.seq_length=64",
            "optimizer.warmup_steps=2", *extra]


def test_run_directory_layout(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    result = run_train(_tiny(run_dir, sample_cache, "train.max_steps=12", "checkpoint.interval=5",
                             "checkpoint.keep=2"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["run"]["dir"] == str(run_dir)

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(METRIC_KEYS <= set(m) for m in metrics)
    assert metrics[-1]["consumed_samples"] == 12 * 16
    assert all(m["tokens_per_s"] > 0 and 0 < m["mfu"] for m in metrics)

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_12"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_10", "step_12"]
    assert {p.name for p in (checkpoints / "step_12").iterdir()} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "meta.json", "manifest.json",
        "config.yaml", "tokenizer"}
    assert {p.name for p in (checkpoints / "step_12" / "tokenizer").iterdir()} == {
        "tokenizer.model", "tokenizer_metadata.json"}  # the run's tokenizer, in the manifest too
    assert "tokenizer/tokenizer.model" in json.loads((checkpoints / "step_12" / "manifest.json").read_text())["files"]
    meta = json.loads((checkpoints / "step_12" / "meta.json").read_text())
    assert meta["progress"]["consumed_tokens"] == 12 * 16 * 64 and meta["layout"]["zero_stage"] == 1
    assert yaml.safe_load(meta["config"])["train"]["max_steps"] == 12 and "git_commit" in meta
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))
    assert str(wandb_runs[0]) in result.stdout and str(checkpoints / "step_12") in result.stdout


def test_restart_resumes_from_latest(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    run_train(_tiny(run_dir, sample_cache, "train.max_steps=6", "optimizer.decay_steps=10"))
    result = run_train(_tiny(run_dir, sample_cache, "train.max_steps=10", "optimizer.decay_steps=10"))
    assert "resumed from" in result.stderr and "step_6" in result.stderr

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[6]["consumed_samples"] == 7 * 16
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    meta = json.loads((run_dir / "checkpoints" / "step_10" / "meta.json").read_text())
    run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert run_ids == {meta["progress"]["wandb_run_id"]}  # both sessions logged to one W&B run


def test_resume_refuses_a_different_model(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    run_train(_tiny(run_dir, sample_cache, "train.max_steps=3", "logging.wandb.mode=disabled"))
    result = run_train(_tiny(run_dir, sample_cache, "train.max_steps=6", "model.num_layers=2"), check=False)
    assert result.returncode == 2
    assert "model.num_layers=4 but the config says model.num_layers=2" in result.stderr


def test_user_errors_are_one_line(tmp_path, sample_cache):
    missing = run_train(_tiny(tmp_path / "a", sample_cache, f"data.blend={tmp_path}/none.json"), check=False)
    assert missing.returncode == 2 and "data.blend=" in missing.stderr and "Traceback" not in missing.stderr
    small = run_train(_tiny(tmp_path / "b", sample_cache, "model.vocab_size=1000"), check=False)
    assert small.returncode == 2 and "set model.vocab_size>=4096" in small.stderr


def test_quickstart_command(tmp_path, sample_cache):
    """The README's quickstart, as a user runs it: loss falls by at least 30% over the run."""
    run_dir = tmp_path / "quickstart"
    env = {**os.environ, "BLOOMTRAIN_RUN_DIR": str(run_dir)}
    result = subprocess.run(["bash", str(REPO / "launch" / "quickstart.sh"), f"data.cache_dir={sample_cache}"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert len(metrics) == 300
    assert metrics[-1]["loss"] <= 0.7 * metrics[0]["loss"]
    assert (run_dir / "checkpoints" / "step_300" / "meta.json").exists()
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    for label in ("run directory", "checkpoint", "W&B files"):
        assert label in result.stdout
