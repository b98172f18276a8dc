"""Dead, hung and interrupted ranks under the launcher (two ranks, gloo): every survivor exits within the
collective timeout with one line saying what it was doing, the launcher names the ranks that failed,
Ctrl-C saves like SIGTERM, no process outlives the launcher, and a restart resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.faults.helpers import assert_one_line_error, latest, metrics, tiny_run

pytestmark = pytest.mark.multiprocess

TIMEOUT_MINUTES = 0.5  # collectives give up after 30 s
HANG_WARNING_MINUTES = 0.2  # the launcher names a silent rank after 12 s


class Launch:
    """``python -m bloomtrain.launch`` with two ranks, stopped after ``max_steps`` unless a fault comes first."""

    def __init__(self, run_dir: Path, cache: Path, max_steps: int = 400) -> None:
        overrides = tiny_run(run_dir, cache, "parallel.data=2", "launch.processes=2", f"train.max_steps={max_steps}",
                             "optimizer.decay_steps=400", "checkpoint.interval=2",
                             f"distributed.timeout_minutes={TIMEOUT_MINUTES}",
                             f"launch.hang_warning_minutes={HANG_WARNING_MINUTES}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.run_dir = run_dir
        self.process = subprocess.Popen([sys.executable, "-m", "bloomtrain.launch", *overrides], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)

    def wait_for_checkpoint(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "checkpoints" / "latest").exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)

    def rank(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "bloomtrain.train" in child.cmdline() and child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"rank {rank} not found")

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """(exit status, stdout + stderr, seconds it took)."""
        started = time.monotonic()
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            from bloomtrain.launch.local import end_process_tree

            end_process_tree(self.process.pid, grace_seconds=2)
            raise AssertionError(f"the launcher did not exit within {timeout} s") from None
        return self.process.returncode, stdout + stderr, time.monotonic() - started


def _processes_of(run_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(f"run.dir={run_dir}" == part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_killed_rank_ends_the_run_in_seconds_and_a_restart_resumes(tmp_path, sample_cache):
    run = Launch(tmp_path / "run", sample_cache)
    run.wait_for_checkpoint()
    run.rank(1).kill()
    status, output, seconds = run.finish(timeout=120)
    assert status != 0 and seconds < 60
    assert_one_line_error(output, "rank 0: a collective failed while", "Another rank died or hung")
    assert_one_line_error(output, "rank 1 (killed by SIGKILL)")
    assert not _processes_of(tmp_path / "run")
    saved = int(latest(tmp_path / "run").removeprefix("step_"))

    again = Launch(tmp_path / "run", sample_cache, max_steps=saved + 2)
    status, output, _ = again.finish(timeout=300)
    assert status == 0, output[-3000:]
    assert f"resumed from {tmp_path / 'run'}/checkpoints/step_{saved}" in output
    assert metrics(tmp_path / "run")[-1]["step"] == saved + 2


def test_a_hung_rank_is_named_by_the_launcher_and_its_peers_give_up_within_the_timeout(tmp_path, sample_cache):
    run = Launch(tmp_path / "run", sample_cache)
    run.wait_for_checkpoint()
    hung = run.rank(1)
    hung.suspend()  # SIGSTOP: alive, silent, holding its peers in the next collective
    try:
        status, output, seconds = run.finish(timeout=180)
    finally:
        if hung.is_running():
            hung.kill()
    assert status != 0
    # Warned first, then rank 0's collective timed out, then torchrun ended the stopped rank.
    assert_one_line_error(output, "rank 1 has not responded for over 0.2 min")
    line = assert_one_line_error(output, "rank 0: a collective failed while", "distributed.timeout_minutes=0.5")
    assert "Timed out" in line or "timed out" in line
    assert seconds < TIMEOUT_MINUTES * 60 + 60  # the timeout, then torchrun's 30 s for a process ignoring SIGTERM
    assert not _processes_of(tmp_path / "run")


def test_ctrl_c_on_the_launcher_saves_and_leaves_no_process_behind(tmp_path, sample_cache):
    run = Launch(tmp_path / "run", sample_cache)
    run.wait_for_checkpoint()
    ranks = [run.rank(0), run.rank(1)]
    run.process.send_signal(signal.SIGINT)
    status, output, seconds = run.finish(timeout=120)
    assert status == 75, output[-3000:]
    assert "Ctrl-C: the ranks save a checkpoint after this step" in output
    stopped_at = metrics(tmp_path / "run")[-1]["step"]
    assert latest(tmp_path / "run") == f"step_{stopped_at}"  # nothing lost: the last step is saved
    assert not any(rank.is_running() for rank in ranks) and not _processes_of(tmp_path / "run")
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
