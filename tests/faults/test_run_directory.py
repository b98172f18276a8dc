"""One run per run directory (``bloomtrain/run_lock.py``): of two starts on one directory exactly one
trains, the other exits 2 in one line naming the holder and writes nothing; a dead holder's lock is
taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bloomtrain.run_lock import LOCK_FILE
from tests.conftest import REPO, with_a_given_peak
from tests.faults.helpers import assert_one_line_error, metrics, tiny_run

pytestmark = pytest.mark.slow


def _start(run_dir, cache, *extra) -> subprocess.Popen:
    overrides = with_a_given_peak(tiny_run(run_dir, cache, "checkpoint.interval=2", "optimizer.decay_steps=400",
                                           *extra))
    return subprocess.Popen([sys.executable, "-m", "bloomtrain.train", *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_starts_on_one_run_directory_train_once_and_a_dead_holder_is_taken_over(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    first, second = (_start(run_dir, sample_cache, "train.max_steps=400") for _ in range(2))
    deadline = time.monotonic() + 300
    while first.poll() is None and second.poll() is None:  # one of them gives up, the other trains on
        assert time.monotonic() < deadline, "neither start gave up"
        time.sleep(0.2)
    refused, holder = (first, second) if first.poll() is not None else (second, first)
    _, stderr = refused.communicate()
    assert refused.returncode == 2, stderr[-3000:]
    lock = json.loads((run_dir / LOCK_FILE).read_text())
    line = assert_one_line_error(stderr, "is in use by another run", f"process {lock['pid']} on {lock['host']}")
    assert "since" in line and "choose another run.dir" in line
    assert lock["pid"] == holder.pid and holder.poll() is None

    # The holder trains alone, every step logged once; then it dies without a word.
    while not (run_dir / "checkpoints" / "latest").exists():
        assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
        time.sleep(0.2)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    steps = [row["step"] for row in metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))
    assert (run_dir / LOCK_FILE).exists()  # left behind by the dead holder

    # A new start sees that the holder is gone, takes over, resumes and ends cleanly.
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    again = _start(run_dir, sample_cache, f"train.max_steps={saved + 2}")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert f"took over {run_dir / LOCK_FILE} from process {holder.pid}" in stderr and "its process is gone" in stderr
    steps = [row["step"] for row in metrics(run_dir)]
    assert steps == list(range(1, saved + 3))
    assert not (run_dir / LOCK_FILE).exists()  # given back at the end
