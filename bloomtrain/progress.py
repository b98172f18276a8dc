"""What the person running a job sees on stdout (rank 0): the live progress line (a rich bar on a
terminal, plain lines otherwise), one-line notices and the closing summary.

Diagnostics for the log (what was loaded, converted, removed) go through ``logging`` to stderr instead.
"""

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
    grad = "-" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.3f}"  # None: an fp16 skipped step
    return (f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | grad {grad} | "
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


def notify(message: str) -> None:
    """A line for the person running the job: something happened that changes what they should expect."""
    print(f"bloomtrain: {message}", flush=True)


def print_summary(rows: dict[str, str]) -> None:
    """The closing lines of a run: where its outputs are."""
    width = max(len(name) for name in rows)
    print("\n".join(f"{name:<{width}} : {value}" for name, value in rows.items()), flush=True)
