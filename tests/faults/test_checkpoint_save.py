"""A save that fails (here: a file-size limit, as a full disk fails writes) leaves the previous
checkpoint intact and ``latest``, removes the partial save, and either stops in one line or, with
``checkpoint.on_error=continue``, trains on."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from tests.conftest import REPO, copy_run, run_train
from tests.faults.helpers import assert_one_line_error, latest, metrics, tiny_run

pytestmark = pytest.mark.slow

LIMIT_BYTES = 2 * 1024 * 1024  # below the optimizer-state file (~16 MB), above every other file the run writes


def _limited_files() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def _train_with_a_full_disk(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloomtrain.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600, preexec_fn=_limited_files)


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, sample_cache, checkpointed_run, on_error):
    run_dir = copy_run(checkpointed_run, tmp_path / "run")
    assert latest(run_dir) == "step_2"

    result = _train_with_a_full_disk(tiny_run(run_dir, sample_cache, "train.max_steps=6", "optimizer.decay_steps=6",
                                              "checkpoint.interval=2", f"checkpoint.on_error={on_error}"))
    output = result.stdout + result.stderr
    assert "bloomtrain: bloomtrain" not in output
    line = assert_one_line_error(output, "saving checkpoint step_4 failed on rank 0",
                                 "step_2 is intact and still latest")
    assert "Free space under" in line
    assert latest(run_dir) == "step_2"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    if on_error == "stop":
        assert result.returncode == 1
        assert metrics(run_dir)[-1]["step"] == 4
    else:
        # Trained on and tried again at the next interval; the last step's save failed too, so the run did
        # not end with a usable checkpoint: exit 1, not 0.
        assert result.returncode == 1, output[-3000:]
        assert metrics(run_dir)[-1]["step"] == 6 and "step_6 failed" in output
        assert_one_line_error(output, "the checkpoint of the last step (6) could not be saved", "step_2")

    # The space comes back: a restart resumes from the intact checkpoint.
    resumed = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=6", "optimizer.decay_steps=6",
                                 "checkpoint.interval=2"))
    assert "resumed from" in resumed.stderr and "step_2" in resumed.stderr
    assert latest(run_dir) == "step_6"
