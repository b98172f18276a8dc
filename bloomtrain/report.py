"""Plots and a summary of a run: ``python -m bloomtrain.report RUN_DIR``.

Reads ``RUN_DIR/metrics.jsonl`` (and ``checkpoints/latest``), prints a summary table and writes
``RUN_DIR/report/curves.png`` (loss, learning rate, gradient norm and throughput against the step)
and ``RUN_DIR/report/summary.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.metrics import METRICS_FILE, read_metrics


def summarize(run_dir: Path) -> dict[str, Any]:
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ValueError(f"{run_dir / METRICS_FILE} has no steps yet")
    losses = [m["loss"] for m in metrics]
    latest = latest_checkpoint(run_dir / "checkpoints")
    return {
        "steps": metrics[-1]["step"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "min_loss": min(losses),
        "loss_drop": 1.0 - losses[-1] / losses[0],
        "median_tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        "median_mfu": statistics.median(m["mfu"] for m in metrics),
        "consumed_samples": metrics[-1]["consumed_samples"],
        "latest_checkpoint": str(latest) if latest else None,
    }


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics]
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
              ("tokens_per_s", "tokens / s")]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        points = [(s, m[key]) for s, m in zip(steps, metrics, strict=True) if m.get(key) is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.suptitle(f"bloomtrain run {run_dir.name}")
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m bloomtrain.report RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    try:
        summary = summarize(run_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"bloomtrain.report: {error}", file=sys.stderr)
        return 2
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    figure = plot(run_dir, out)
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}} : {shown}")
    print(f"{'curves':<{width}} : {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
