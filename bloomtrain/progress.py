"""The live progress line of a training run (rank 0): a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _summary(metrics: dict[str, Any]) -> str:
    return (f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
            f"{metrics['tokens_per_s']:,.0f} tok/s | mfu {metrics['mfu']:.1%}")


class StepProgress:
    def __init__(self, total_steps: int, start_step: int, print_interval: int, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.print_interval = print_interval
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty()
        self._progress: Progress | None = None
        self._task = None
        self._start_step = start_step

    def __enter__(self) -> StepProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps, completed=self._start_step,
                                                 summary="")
        return self

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=_summary(metrics))
        elif step % self.print_interval == 0 or step == self.total_steps or step == self._start_step + 1:
            print(f"step {step}/{self.total_steps} | {_summary(metrics)}", flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
