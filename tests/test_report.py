"""``python -m bloomtrain.report RUN_DIR``: the summary it computes and the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys


def _write_metrics(run_dir, losses):
    run_dir.mkdir()
    lines = [{"step": i + 1, "loss": loss, "lr": 1e-3, "grad_norm": None if i == 1 else 0.5,
              "tokens_per_s": 1000.0 * (i + 1), "tflops": 0.1, "mfu": 0.25, "consumed_samples": 16 * (i + 1)}
             for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_report_summarises_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, [8.0, 6.0, 5.0, 5.5])
    result = subprocess.run([sys.executable, "-m", "bloomtrain.report", str(run_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["min_loss"] == 5.0 and summary["last_loss"] == 5.5
    assert abs(summary["loss_drop"] - (1 - 5.5 / 8.0)) < 1e-12
    assert summary["median_tokens_per_s"] == 2500.0 and summary["consumed_samples"] == 64
    assert summary["latest_checkpoint"] is None
    assert (run_dir / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss_drop" in result.stdout and "curves.png" in result.stdout


def test_report_on_a_missing_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bloomtrain.report", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def _write_evaluations(run_dir, steps_losses):
    lines = [{"step": step, "loss": loss, "perplexity": 2.0 ** loss,
              "languages": {"en": {"loss": loss - 0.5, "perplexity": 1.0, "tokens": 64},
                            "zh": {"loss": loss + 0.5, "perplexity": 1.0, "tokens": 64}}}
             for step, loss in steps_losses]
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_report_overlays_runs_with_validation_per_language(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _write_metrics(first, [8.0, 6.0, 5.0, 5.5])
    _write_metrics(second, [8.0, 7.0, 6.5, 6.0])
    _write_evaluations(first, [(2, 7.0), (4, 6.0)])
    out = tmp_path / "compare"
    result = subprocess.run([sys.executable, "-m", "bloomtrain.report", str(first), str(second), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summaries = json.loads((out / "summary.json").read_text())
    assert summaries[str(first)]["last_valid_loss"] == 6.0 and summaries[str(first)]["first_valid_loss"] == 7.0
    assert summaries[str(first)]["valid_languages"]["zh"] == {"first_loss": 7.5, "last_loss": 6.5,
                                                               "last_perplexity": 1.0}
    assert "last_valid_loss" not in summaries[str(second)]  # that run never evaluated
    table = (out / "summary.md").read_text()
    assert f"| | {first} | {second} |" in table and "| last_valid_loss | 6 | - |" in table
    assert "| zh | 7.5 | 6.5 | 1 |" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
