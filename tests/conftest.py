"""Shared fixtures: the bundled sample prepared once per session, and a helper that runs training."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep W&B and every cache inside the test's temporary folders, never in the user's home.
os.environ.setdefault("WANDB_SILENT", "true")
# megatron-core warns at import (during collection, before pytest's filters apply) that TE/Apex are absent.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    from data_tools.sample import prepare_sample

    cache = tmp_path_factory.mktemp("cache")
    prepare_sample(cache)
    return cache


def run_train(overrides: list[str], cwd: Path = REPO, check: bool = True, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bloomtrain.train`` as a user would; returns the finished process."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "bloomtrain.train", *overrides], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
