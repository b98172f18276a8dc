"""What the fault tests share: a few-step run of the quickstart on the bundled sample, and the checks
that an outcome was "handled" (one line from bloomtrain, no library traceback)."""

from __future__ import annotations

from pathlib import Path

from bloomtrain.metrics import read_metrics
from tests import conftest


def tiny_run(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """The suite's tiny run (``tests/conftest.py``) with one warm-up step: faults show up sooner."""
    return conftest.tiny_run(run_dir, cache, "optimizer.warmup_steps=1", *extra)


def assert_one_line_error(stderr: str, *expected: str) -> str:
    """The line of ``stderr`` that says what went wrong, with every ``expected`` piece; no traceback."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("bloomtrain")]
    matching = [line for line in lines if all(piece in line for piece in expected)]
    assert matching, f"no line with {expected} in:\n{stderr[-4000:]}"
    return matching[0]


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()
