"""Rank-0 metrics: ``RUN_DIR/metrics.jsonl`` and Weights & Biases (offline unless asked otherwise).

W&B is imported only when used. A resumed run continues the same W&B run (its id is kept in the
checkpoint) and drops from ``metrics.jsonl`` any lines past the step it resumed from, so a crash
between two checkpoints does not leave the re-done steps twice in the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bloomtrain.config import WandbConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_config: WandbConfig, run_name: str, config: dict[str, Any],
                 resume_step: int = 0, wandb_run_id: str | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        _truncate_after(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb_run = _start_wandb(run_dir, wandb_config, run_name, config, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb_run.dir if self._wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _start_wandb(run_dir: Path, config: WandbConfig, run_name: str, run_config: dict[str, Any],
                 run_id: str | None):
    if config.mode == "disabled":
        return None
    mode = config.mode
    if mode == "online" and not _has_wandb_credentials():
        logger.warning("logging.wandb.mode=online but no WANDB_API_KEY or wandb login found; logging offline "
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
