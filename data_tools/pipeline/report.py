"""The pipeline's report: per step and per language, documents and bytes in and out, drops by reason,
and tokens per language — as ``report/report.json``, a table, and ``report/funnel.png``."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.pipeline.config import PipelineConfig
from data_tools.pipeline.stages import work_dir
from data_tools.steps.base import StepStats


def collect(config: PipelineConfig, shards: int) -> dict:
    steps: dict[str, StepStats] = {}
    for shard in range(shards):
        records = json.loads((work_dir(config) / "clean" / f"{shard:05d}.stats.json").read_text())
        records.append(json.loads((work_dir(config) / "dedup" / f"{shard:05d}.stats.json").read_text()))
        for record in records:
            stats = StepStats.from_json(record)
            steps.setdefault(stats.step, StepStats(stats.step)).merge(stats)
    blend = json.loads((Path(config.output.dir) / "blend.json").read_text())
    return {"steps": [stats.to_json() for stats in steps.values()],
            "tokens": {entry["lang"]: entry["tokens"] for entry in blend["datasets"]},
            "weights": {entry["lang"]: entry["weight"] for entry in blend["datasets"]}}


def _total(counts: dict, key: str) -> int:
    return sum(value[key] for value in counts.values())


def table(report: dict) -> str:
    lines = [f"{'step':14}{'docs in':>10}{'docs out':>10}{'MB in':>9}{'MB out':>9}  dropped (reason: documents)"]
    for step in report["steps"]:
        docs_in = _total(step["in"], "documents") if step["in"] else None
        reasons = ", ".join(f"{reason}: {sum(by_language.values())}" for reason, by_language in step["dropped"].items())
        counters = ", ".join(f"{name}: {value}" for name, value in step["counters"].items())
        lines.append(f"{step['step']:14}{docs_in if docs_in is not None else '':>10}"
                     f"{_total(step['out'], 'documents'):>10}"
                     f"{(_total(step['in'], 'bytes') / 1e6 if step['in'] else 0):>9.2f}"
                     f"{_total(step['out'], 'bytes') / 1e6:>9.2f}  {reasons}{'; ' if reasons and counters else ''}"
                     f"{counters}")
    lines.append("tokens: " + ", ".join(f"{lang} {count:,} (weight {report['weights'][lang]:.3f})"
                                        for lang, count in sorted(report["tokens"].items())))
    return "\n".join(lines)


def write_report(config: PipelineConfig, shards: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = collect(config, shards)
    folder = Path(config.output.dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    names = [step["step"] for step in report["steps"]]
    kept = [_total(step["out"], "documents") for step in report["steps"]]
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    axis.barh(names[::-1], kept[::-1], color="#4c72b0")
    for position, value in enumerate(kept[::-1]):
        axis.text(value, position, f" {value:,}", va="center")
    axis.set_xlabel("documents remaining after the step")
    axis.set_title("bloomtrain data pipeline: documents through each step")
    figure.tight_layout()
    figure.savefig(folder / "funnel.png", dpi=100)
    plt.close(figure)
    return report
