"""The pipeline's report, in ``output.dir/report/``: ``report.json``, a printed table, and two charts.

report.json holds
- ``steps``: per cleaning step (and dedup), per language, documents and bytes in and out and drops by
  reason — the datatrove-style stats every step keeps;
- ``languages``: the same per language — documents after each step with the drop reasons, tokens
  written (train and held-out validation), and the tokenizer's fertility: tokens per word (as BLOOM's
  and ROOTS' papers report it), and per character for languages written without spaces;
- ``stages``: per stage, tasks, task-seconds, MB/s per task and the peak resident memory of a task;
- ``tokenizer``: what tokenizer training chose (character coverage, characters kept as pieces);
- ``tokens`` and ``weights``: the blend.

Charts (``data_tools/pipeline/charts.py``): ``funnel.png`` (per language, documents left after each step)
and ``tokens.png`` (tokens and fertility per language). With ``wandb.mode`` offline or online all of it
is logged to a W&B run too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from data_tools.pipeline.config import PipelineConfig
from data_tools.pipeline.stages import SPLITS, STAGES, work_dir
from data_tools.steps.base import StepStats
from data_tools.text import NO_SPACE_LANGUAGES


def collect(config: PipelineConfig, shards: int) -> dict:
    steps: dict[str, StepStats] = {}
    for shard in range(shards):
        records = json.loads((work_dir(config) / "clean" / f"{shard:05d}.stats.json").read_text())
        records.append(json.loads((work_dir(config) / "dedup" / f"{shard:05d}.stats.json").read_text()))
        for record in records:
            stats = StepStats.from_json(record)
            steps.setdefault(stats.step, StepStats(stats.step)).merge(stats)
    blend = json.loads((Path(config.output.dir) / "blend.json").read_text())
    tokens, text = _token_counts(config, shards)
    training = Path(config.output.dir) / "tokenizer" / "training.json"
    return {"steps": [stats.to_json() for stats in steps.values()],
            "languages": per_language(list(steps.values()), tokens, text),
            "stages": stage_measures(config),
            "tokenizer": json.loads(training.read_text()) if training.exists() else
            {"existing": config.tokenizer.existing},
            "tokens": {entry["lang"]: entry["tokens"] for entry in blend["datasets"]},
            "weights": {entry["lang"]: entry["weight"] for entry in blend["datasets"]}}


def _token_counts(config: PipelineConfig, shards: int) -> tuple[dict, dict]:
    """Tokens per split and language (EOS included) and the text they came from, over all shards."""
    tokens: dict[str, dict[str, int]] = {split: defaultdict(int) for split in SPLITS}
    text: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for shard in range(shards):
        folder = work_dir(config) / "tokens" / f"{shard:05d}"
        for split, counts in json.loads((folder / "counts.json").read_text()).items():
            for language, count in counts.items():
                tokens[split][language] += count
        for by_language in json.loads((folder / "text.json").read_text()).values():
            for language, measures in by_language.items():
                for key, value in measures.items():
                    text[language][key] += value
    return tokens, text


def per_language(steps: list[StepStats], tokens: dict, text: dict) -> dict:
    """Per language: documents and bytes after each step, drops by step and reason, tokens, fertility."""
    languages: dict[str, dict] = {}
    identified = {language for step in steps if step.step != "read" for language in step.outputs}
    for language in sorted(identified | set(tokens["train"])):
        funnel, dropped = [], {}
        for step in steps:
            if step.step in ("read", "normalize"):  # before language id every document is "unknown"
                continue
            out = step.outputs.get(language, {"documents": 0, "bytes": 0})
            funnel.append({"step": step.step, "documents": out["documents"], "bytes": out["bytes"]})
            for reason, by_language in step.dropped.items():
                if by_language.get(language):
                    dropped[f"{step.step}: {reason}"] = by_language[language]
        if not (funnel and funnel[0]["documents"]) and not tokens["train"].get(language):
            continue  # "unknown" before language id, when language id dropped every such document
        measures = text.get(language, {})
        content_tokens = sum(tokens[split].get(language, 0) for split in SPLITS) - measures.get("documents", 0)
        languages[language] = {
            "funnel": funnel, "dropped": dropped,
            "tokens": {split: tokens[split].get(language, 0) for split in SPLITS},
            "words": measures.get("words", 0), "characters": measures.get("characters", 0),
            "fertility": fertility(content_tokens, measures, language)}
    return languages


def fertility(content_tokens: int, measures: dict, language: str) -> dict:
    """Tokens (EOS not counted) per word and per character; ``value`` is the one that suits the script."""
    per_word = content_tokens / measures["words"] if measures.get("words") else None
    per_character = content_tokens / measures["characters"] if measures.get("characters") else None
    by_characters = language in NO_SPACE_LANGUAGES
    return {"tokens_per_word": _round(per_word), "tokens_per_character": _round(per_character),
            "value": _round(per_character if by_characters else per_word),
            "unit": "tokens per character" if by_characters else "tokens per word"}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def stage_measures(config: PipelineConfig) -> dict:
    """Per stage from each task's timing record: task-seconds, MB/s per task, peak resident memory."""
    measures = {}
    for stage, _, _ in STAGES:
        paths = sorted((work_dir(config) / "timing").glob(f"{stage}-*.json"))
        records = [json.loads(path.read_text()) for path in paths]
        if not records:
            continue
        seconds = sum(r["seconds"] for r in records)
        megabytes = sum(r["bytes"] for r in records) / 1e6
        measures[stage] = {"tasks": len(records), "task_seconds": round(seconds, 3),
                           "documents": sum(r["documents"] for r in records), "megabytes": round(megabytes, 3),
                           "mb_per_second": round(megabytes / seconds, 3) if seconds and megabytes else None,
                           "peak_rss_mb": round(max(r["peak_rss_bytes"] for r in records) / 1e6, 1)}
    return measures


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
    lines.append("")
    lines.append(f"{'language':9}{'identified':>11}{'kept':>7}{'train tokens':>14}{'valid tokens':>14}"
                 f"{'fertility':>11}  most documents dropped by")
    for language, entry in report["languages"].items():
        funnel = entry["funnel"]
        identified = funnel[0]["documents"] if funnel else 0
        top = max(entry["dropped"].items(), key=lambda item: item[1], default=None)
        value = entry["fertility"]["value"]
        unit = "/char" if entry["fertility"]["unit"] == "tokens per character" else "/word"
        lines.append(f"{language:9}{identified:>11,}{funnel[-1]['documents'] if funnel else 0:>7,}"
                     f"{entry['tokens']['train']:>14,}{entry['tokens']['valid']:>14,}"
                     f"{(f'{value:.2f}{unit}' if value is not None else '-'):>11}  "
                     f"{f'{top[0]} ({top[1]:,})' if top else ''}")
    tokenizer = report["tokenizer"]
    if "character_coverage" in tokenizer:
        lines.append(f"\ntokenizer: {tokenizer['model_type']} {tokenizer['vocab_size']:,}, character coverage "
                     f"{tokenizer['character_coverage']:.4%} ({tokenizer['characters_as_pieces']:,} of "
                     f"{tokenizer['distinct_characters']:,} characters are pieces; the rest, "
                     f"{tokenizer['byte_fallback_share']:.3%} of the sample, become bytes)")
    lines.append("stages: " + ", ".join(
        f"{stage} {m['task_seconds']:.1f} s" + (f" {m['mb_per_second']:.2f} MB/s" if m["mb_per_second"] else "")
        + f" peak {m['peak_rss_mb']:.0f} MB" for stage, m in report["stages"].items()))
    return "\n".join(lines)


def write_report(config: PipelineConfig, shards: int) -> dict:
    from data_tools.pipeline.charts import funnel_chart, tokens_chart

    report = collect(config, shards)
    folder = Path(config.output.dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    charts = {"funnel": funnel_chart(report["languages"], folder / "funnel.png"),
              "tokens": tokens_chart(report["languages"], folder / "tokens.png")}
    if config.wandb.mode != "disabled":
        log_to_wandb(config, report, charts)
    return report


def log_to_wandb(config: PipelineConfig, report: dict, charts: dict[str, Path]) -> None:
    """One W&B run per pipeline output: the charts, a per-language table and the totals as its summary."""
    import wandb

    from bloomtrain.metrics import start_wandb

    run = start_wandb(Path(config.output.dir) / "report", config.wandb, f"data-{Path(config.output.dir).name}",
                      {"input": list(config.input.paths), "tokenizer": report["tokenizer"]}, None)
    columns = ["language", "identified", "kept", "train_tokens", "valid_tokens", "fertility", "fertility_unit"]
    rows = [[language, entry["funnel"][0]["documents"] if entry["funnel"] else 0,
             entry["funnel"][-1]["documents"] if entry["funnel"] else 0, entry["tokens"]["train"],
             entry["tokens"]["valid"], entry["fertility"]["value"], entry["fertility"]["unit"]]
            for language, entry in report["languages"].items()]
    run.log({"languages": wandb.Table(columns=columns, data=rows),
             **{f"chart/{name}": wandb.Image(str(path)) for name, path in charts.items()}})
    for language, entry in report["languages"].items():
        run.summary[f"tokens/{language}"] = entry["tokens"]["train"]
        run.summary[f"fertility/{language}"] = entry["fertility"]["value"]
    for stage, measures in report["stages"].items():
        run.summary[f"stage/{stage}/mb_per_second"] = measures["mb_per_second"]
        run.summary[f"stage/{stage}/peak_rss_mb"] = measures["peak_rss_mb"]
    run.finish()
