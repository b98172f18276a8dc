"""Rank 0's metrics, one interface over three back-ends: JSON Lines files in the run directory
(``metrics.jsonl`` per step, ``eval.jsonl`` per evaluation), Weights & Biases (offline unless asked
otherwise) and TensorBoard (``RUN_DIR/tensorboard/`` with ``logging.tensorboard=true``).

W&B and TensorBoard are imported only when used. A resumed run continues the same W&B run (its id is
kept in the checkpoint), drops from the JSON Lines files any lines past the step it resumed from, and
has TensorBoard purge events past that step, so a crash between two checkpoints never leaves the
re-done steps twice.

Evaluations reach W&B and TensorBoard as ``valid/loss``, ``valid/perplexity`` and
``valid/<lang>/loss``, ``valid/<lang>/perplexity``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bloomtrain.config import LoggingConfig, WandbConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    def __init__(self, run_dir: Path, config: LoggingConfig, run_name: str, run_config: dict[str, Any],
                 resume_step: int = 0, wandb_run_id: str | None = None) -> None:
        self._files = {}
        self._run_dir = Path(run_dir)
        for name in (METRICS_FILE, EVAL_FILE):
            _truncate_after(run_dir / name, resume_step)
            self._files[name] = (run_dir / name).open("a", encoding="utf-8")
        self._wandb_run = start_wandb(run_dir, config.wandb, run_name, run_config, wandb_run_id)
        self._tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb_run.dir if self._wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One optimizer step's metrics."""
        self._write(METRICS_FILE, {"step": step, **metrics})
        self._publish({key: value for key, value in metrics.items() if _is_number(value)}, step)

    def log_eval(self, evaluation: dict[str, Any] | None, step: int, tasks: dict[str, float] | None = None) -> None:
        """One evaluation: ``{"loss", "perplexity", "languages": {lang: {"loss", "perplexity", "tokens"}}}``
        and/or task scores ``{"<task>/<metric>": value}`` (``"tasks": {task: {metric: value}}`` in
        eval.jsonl, ``tasks/<task>/<metric>`` for W&B and TensorBoard)."""
        nested: dict[str, dict[str, float]] = {}
        for name, value in (tasks or {}).items():
            task, metric = name.rsplit("/", 1)
            nested.setdefault(task, {})[metric] = value
        self._write(EVAL_FILE, {"step": step, **(evaluation or {}), **({"tasks": nested} if nested else {})})
        scalars = {f"tasks/{name}": value for name, value in (tasks or {}).items()}
        if evaluation is not None:
            scalars.update({"valid/loss": evaluation["loss"], "valid/perplexity": evaluation["perplexity"]})
            for language, values in evaluation["languages"].items():
                scalars[f"valid/{language}/loss"] = values["loss"]
                scalars[f"valid/{language}/perplexity"] = values["perplexity"]
            pretraining = evaluation.get("pretraining")  # a fine-tuning run's starting data: does it forget?
            if pretraining:
                scalars["pretraining/loss"] = pretraining["loss"]
                scalars.update({f"pretraining/{language}/loss": values["loss"]
                                for language, values in pretraining["languages"].items()})
        self._publish(scalars, step)

    def _write(self, name: str, record: dict[str, Any]) -> None:
        self._files[name].write(json.dumps(record) + "\n")
        self._files[name].flush()

    def _publish(self, scalars: dict[str, float], step: int) -> None:
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def rewind(self, step: int) -> None:
        """Forget the steps after ``step`` (a loss-spike rollback): the JSON Lines files drop them and
        TensorBoard purges them. W&B keeps what it received and ignores re-logged steps until the run
        passes the old ones (its steps only increase); the rollback itself is in the log and the files."""
        for name, handle in self._files.items():
            handle.close()
            _truncate_after(self._run_dir / name, step)
            self._files[name] = (self._run_dir / name).open("a", encoding="utf-8")
        if self._tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard.close()
            self._tensorboard = SummaryWriter(str(self._run_dir / TENSORBOARD_DIR), purge_step=step + 1)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (or ``eval.jsonl`` with ``name=EVAL_FILE``); none if it is missing."""
    path = Path(run_dir) / name
    if name == EVAL_FILE and not path.exists():
        return []
    return [json.loads(line) for line in _whole_lines(path.read_text(encoding="utf-8"))]


def _whole_lines(text: str) -> list[str]:
    """The non-empty lines that were written whole. The file is read while the run appends to it, and a kill
    can land in a write: a last line without its newline is still being written, or never will be."""
    return [line for line in text.split("\n")[:-1] if line.strip()]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    kept = [line for line in _whole_lines(text) if json.loads(line)["step"] <= step]
    if "".join(line + "\n" for line in kept) != text:
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def start_wandb(run_dir: Path, config: WandbConfig, run_name: str, run_config: dict[str, Any],
                run_id: str | None):
    """A W&B run writing under ``run_dir/wandb`` (or None when disabled); online without credentials
    falls back to offline with a warning. Also used by the data pipeline's report."""
    if config.mode == "disabled":
        return None
    mode = config.mode
    if mode == "online" and not _has_wandb_credentials():
        logger.warning("wandb.mode=online but no WANDB_API_KEY or wandb login found; logging offline "
                       "(sync later with `wandb sync %s/wandb/offline-run-*`)", run_dir)
        mode = "offline"
    import wandb

    return wandb.init(
        project=config.project,
        entity=config.entity,
        name=run_name,
        dir=str(run_dir),
        mode=mode,
        id=run_id,
        resume="allow",
        config=run_config,
        settings=wandb.Settings(silent=True),
    )


def summary_rows(run_dir: Path, latest_checkpoint: Path | None, wandb_files: Path | None,
                 tensorboard: bool) -> dict[str, str]:
    """What a finished run prints last: where its files are, and how each language's validation loss fell."""
    rows = {
        "run directory": str(run_dir.resolve()),
        "metrics": str((run_dir / METRICS_FILE).resolve()),
        "checkpoint": str(latest_checkpoint.resolve()) if latest_checkpoint else "(none)",
        "W&B files": str(wandb_files or "(W&B disabled)"),
    }
    if tensorboard:
        rows["TensorBoard"] = f"tensorboard --logdir {(run_dir / TENSORBOARD_DIR).resolve()}"
    evaluations = [record for record in read_metrics(run_dir, EVAL_FILE) if "loss" in record]
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        rows["validation"] = (f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
                              f"(step {last['step']}), {(run_dir / EVAL_FILE).resolve()}")
        for language, values in last["languages"].items():
            before = first["languages"].get(language, {}).get("loss", float("nan"))
            rows[f"  valid {language}"] = f"loss {before:.3f} -> {values['loss']:.3f}"
    scored = [record for record in read_metrics(run_dir, EVAL_FILE) if record.get("tasks")]
    if scored:
        rows["tasks"] = f"step {scored[-1]['step']}: " + ", ".join(
            f"{task}/{metric} {value:.4g}" for task, metrics in scored[-1]["tasks"].items()
            for metric, value in metrics.items())
    return rows
