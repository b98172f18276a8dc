"""Plots and a summary of one run or several overlaid: ``python -m bloomtrain.report RUN_DIR [RUN_DIR ...]``.

Reads each run's ``metrics.jsonl``, ``eval.jsonl`` and ``checkpoints/latest``; prints a summary and writes,
into ``RUN_DIR/report/`` (one run) or ``--out`` (several, default ``./bloomtrain-report``):

- ``curves.png``: training loss with the validation loss, validation loss per language (one run) or per
  run, task scores (``eval.tasks``), learning rate, gradient norm, tokens/s and MFU, against the step, runs
  overlaid;
- ``summary.json`` (one run: its summary; several: one per run) and ``summary.md``, the same as tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.metrics import EVAL_FILE, METRICS_FILE, read_metrics


def summarize(run_dir: Path) -> dict[str, Any]:
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ValueError(f"{run_dir / METRICS_FILE} has no steps yet")
    losses = [m["loss"] for m in metrics]
    latest = latest_checkpoint(run_dir / "checkpoints")
    summary = {
        "steps": metrics[-1]["step"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "min_loss": min(losses),
        "loss_drop": 1.0 - losses[-1] / losses[0],
        "median_tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        "median_mfu": statistics.median(m["mfu"] for m in metrics),
        "peak_memory_gb": max((m.get("peak_memory_gb") or 0.0 for m in metrics), default=0.0) or None,
        "consumed_samples": metrics[-1]["consumed_samples"],
        "latest_checkpoint": str(latest) if latest else None,
    }
    records = read_metrics(run_dir, EVAL_FILE)
    evaluations = [record for record in records if "loss" in record]  # the others hold task scores only
    scored = [record for record in records if record.get("tasks")]
    if scored:
        summary.update({"tasks_step": scored[-1]["step"], "tasks": {
            f"{task}/{metric}": value for task, metrics in scored[-1]["tasks"].items()
            for metric, value in metrics.items()}})
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        summary.update({
            "first_valid_loss": first["loss"], "last_valid_loss": last["loss"],
            "last_valid_perplexity": last["perplexity"], "valid_step": last["step"],
            "valid_languages": {language: {"first_loss": first["languages"].get(language, {}).get("loss"),
                                           "last_loss": values["loss"], "last_perplexity": values["perplexity"]}
                                for language, values in last["languages"].items()},
        })
    return summary


def plot(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [("loss", "loss (train; validation dashed)"), ("valid", "validation loss"),
              ("tasks", "task scores (eval.tasks)"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
              ("tokens_per_s", "tokens / s"), ("mfu", "MFU")]
    figure, axes = plt.subplots(2, 4, figsize=(18, 7.5), sharex=True)
    several = len(run_dirs) > 1
    for index, run_dir in enumerate(run_dirs):
        color = f"C{index % 10}"
        label = run_dir.name if several else None
        metrics, records = read_metrics(run_dir), read_metrics(run_dir, EVAL_FILE)
        evaluations = [record for record in records if "loss" in record]
        for axis, (key, title) in zip(axes.flat, panels, strict=False):
            axis.set_title(title)
            if key == "valid":
                _plot_validation(axis, evaluations, color, label if several else None, per_language=not several)
                continue
            if key == "tasks":
                _plot_tasks(axis, [record for record in records if record.get("tasks")], label)
                continue
            points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2, color=color, label=label)
            if key == "loss" and evaluations:
                axis.plot([e["step"] for e in evaluations], [e["loss"] for e in evaluations], "--o", markersize=3,
                          color=color)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    axes.flat[-1].axis("off")
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.suptitle("bloomtrain " + (f"runs {', '.join(d.name for d in run_dirs)}" if several else
                                     f"run {run_dirs[0].name}"))
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_validation(axis, evaluations: list[dict], color: str, label: str | None, per_language: bool) -> None:
    if not evaluations:
        axis.text(0.5, 0.5, "no evaluations (eval.interval)", ha="center", va="center", transform=axis.transAxes)
        return
    steps = [e["step"] for e in evaluations]
    if per_language:
        import matplotlib.pyplot as plt

        for index, language in enumerate(evaluations[-1]["languages"]):
            axis.plot(steps, [e["languages"].get(language, {}).get("loss") for e in evaluations], linewidth=1,
                      marker="o", markersize=2, label=language, color=plt.cm.tab20(index % 20))
        axis.plot(steps, [e["loss"] for e in evaluations], color="black", linewidth=2, label="overall")
    else:
        axis.plot(steps, [e["loss"] for e in evaluations], color=color, marker="o", markersize=3, label=label)


def _plot_tasks(axis, scored: list[dict], run_label: str | None) -> None:
    if not scored:
        axis.text(0.5, 0.5, "no task scores (eval.tasks)", ha="center", va="center", transform=axis.transAxes)
        return
    for task, metrics in scored[-1]["tasks"].items():
        for metric in metrics:
            points = [(record["step"], record["tasks"][task][metric]) for record in scored
                      if metric in record["tasks"].get(task, {})]
            name = f"{task}/{metric}"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1,
                      label=f"{run_label}: {name}" if run_label else name)


def markdown(summaries: dict[str, dict[str, Any]]) -> str:
    names = list(summaries)
    rows = ["steps", "first_loss", "last_loss", "loss_drop", "first_valid_loss", "last_valid_loss",
            "last_valid_perplexity", "median_tokens_per_s", "median_mfu", "peak_memory_gb", "consumed_samples",
            "latest_checkpoint"]
    lines = ["# bloomtrain report", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_shown(summaries[name].get(row)) for name in names) + " |")
    for name, summary in summaries.items():
        if summary.get("valid_languages"):
            lines += ["", f"## Validation per language: {name} (step {summary['valid_step']})", "",
                      "| language | first loss | last loss | last perplexity |", "|---|---|---|---|"]
            for language, values in summary["valid_languages"].items():
                lines.append(f"| {language} | {_shown(values['first_loss'])} | {_shown(values['last_loss'])} | "
                             f"{_shown(values['last_perplexity'])} |")
        if summary.get("tasks"):
            lines += ["", f"## Task scores: {name} (step {summary['tasks_step']})", "", "| task/metric | score |",
                      "|---|---|"]
            lines += [f"| {task} | {_shown(value)} |" for task, value in summary["tasks"].items()]
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomtrain.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/report, or ./bloomtrain-report)")
    args = parser.parse_args(argv)
    try:
        summaries = {str(run_dir): summarize(run_dir) for run_dir in args.run_dirs}
    except (FileNotFoundError, ValueError) as error:
        print(f"bloomtrain.report: {error}", file=sys.stderr)
        return 2
    several = len(args.run_dirs) > 1
    out = args.out or (Path("bloomtrain-report") if several else args.run_dirs[0] / "report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summaries if several else next(iter(summaries.values())),
                                                 indent=2))
    (out / "summary.md").write_text(markdown(summaries))
    figure = plot(args.run_dirs, out)
    for name, summary in summaries.items():
        if several:
            print(f"== {name}")
        shown = {key: value for key, value in summary.items() if key not in ("valid_languages", "tasks")}
        width = max(len(key) for key in shown)
        for key, value in shown.items():
            print(f"{key:<{width}} : {_shown(value)}")
    print(f"curves : {figure}\nsummary: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
