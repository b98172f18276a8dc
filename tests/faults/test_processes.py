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

from tests.conftest import REPO, run_torchrun
from tests.faults.helpers import assert_one_line_error, latest, metrics, tiny_run

pytestmark = pytest.mark.multiprocess



class Launch:
    """``python -m bloomtrain.launch`` with two ranks, stopped after ``max_steps`` unless a fault comes first."""

    def __init__(self, run_dir: Path, cache: Path, max_steps: int = 400, *extra: str) -> None:
        overrides = tiny_run(run_dir, cache, "parallel.data=2", "launch.processes=2", f"train.max_steps={max_steps}",
                             "optimizer.decay_steps=400", "checkpoint.interval=2", *extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.run_dir = run_dir
        # The output goes to a file, so a test can read what was said so far while the run goes on.
        self.output = run_dir.parent / f"{run_dir.name}-launcher-{time.monotonic_ns()}.log"
        with self.output.open("w") as output:
            self.process = subprocess.Popen([sys.executable, "-m", "bloomtrain.launch", *overrides], cwd=REPO,
                                            env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True)

    def said(self) -> str:
        return self.output.read_text()

    def wait_for_checkpoint(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "checkpoints" / "latest").exists():
            assert self.process.poll() is None, self.said()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)

    def rank(self, rank: int) -> psutil.Process:
        """The rank's own process (torchrun's child), not its data loader's worker, which shares its command."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if ("bloomtrain.train" in child.cmdline() and child.environ().get("RANK") == str(rank)
                        and "bloomtrain.launch.torchrun" in child.parent().cmdline()):
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"rank {rank} not found")

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """(exit status, what it said, seconds it took)."""
        started = time.monotonic()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            from bloomtrain.launch.local import end_process_tree

            end_process_tree(self.process.pid, grace_seconds=2)
            raise AssertionError(f"the launcher did not exit within {timeout} s") from None
        return self.process.returncode, self.said(), time.monotonic() - started


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


def test_a_hung_rank_is_named_and_the_run_ends_at_the_speed_of_the_step(tmp_path, sample_cache):
    """Once the steps are timed (0.1 s each here), the launcher names a silent rank after 30 s (10 steps'
    worth, at least 30 s) and its peers' collectives give up after 40 s (20 steps' worth, at least
    distributed.min_step_timeout_seconds: a minute by default, 40 s here to keep the test short), instead
    of the start-up bounds of 5 and 10 minutes."""
    # No checkpoints: a save keeps the start-up bound (10 min), and the stop must land in a step.
    run = Launch(tmp_path / "run", sample_cache, 400, "checkpoint.interval=0",
                 "distributed.min_step_timeout_seconds=40")
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(metrics(tmp_path / "run")) < 6:
        assert time.monotonic() < deadline and run.process.poll() is None, run.said()[-3000:]
        time.sleep(0.1)
    hung = run.rank(1)
    hung.suspend()  # SIGSTOP: alive, silent, holding its peers in the next collective
    stopped = time.monotonic()
    named_after = None
    try:
        while run.process.poll() is None and time.monotonic() - stopped < 200:
            time.sleep(0.5)
            if named_after is None and "rank 1 has not responded" in run.said():
                named_after = time.monotonic() - stopped
        status, output, _ = run.finish(timeout=30)
    finally:
        if hung.is_running():
            hung.kill()
    ended_after = time.monotonic() - stopped
    assert status != 0
    line = assert_one_line_error(output, "rank 1 has not responded for over 30 s")
    assert named_after is not None and named_after < 60, (named_after, line)
    line = assert_one_line_error(output, "rank 0: a collective failed while", "collectives gave up after 40 s")
    assert "Timed out" in line or "timed out" in line
    assert ended_after < 180, ended_after  # the timeout, then torchrun's 30 s for a process ignoring SIGTERM
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


def test_a_run_stopped_while_deepspeed_compiles_its_op_leaves_nothing_that_hangs_the_next(tmp_path, sample_cache):
    """On a clean cache the first run compiles DeepSpeed's CPU communication op under a lock. Ctrl-C on the
    launcher then reaches the build as a KeyboardInterrupt, which gives the lock back; a scheduler's SIGKILL
    (or SIGTERM, before the ranks handle signals) leaves it behind. The next start, two ranks at once, says
    what it recovered, compiles once without deadlock and trains."""
    cache = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    lock = cache / "deepspeed_shm_comm" / "lock"

    def build_started_since(moment: float) -> bool:
        try:
            return lock.stat().st_mtime > moment
        except FileNotFoundError:
            return False

    def start_and_stop_mid_build(command: list[str], stop, started: float) -> str:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while not build_started_since(started):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.1)
        stop(process)
        return process.communicate(timeout=120)[0]

    start_and_stop_mid_build([sys.executable, "-m", "bloomtrain.launch", "launch.processes=1",
                              *tiny_run(tmp_path / "first", sample_cache, "train.max_steps=2")],
                             lambda process: process.send_signal(signal.SIGINT), time.time())  # Ctrl-C
    output = start_and_stop_mid_build(
        [sys.executable, "-m", "bloomtrain.train", *tiny_run(tmp_path / "second", sample_cache, "train.max_steps=2")],
        lambda process: os.killpg(process.pid, signal.SIGKILL), time.time())  # the run, its ninja and compiler
    assert lock.exists(), output[-3000:]

    result = run_torchrun(2, tiny_run(tmp_path / "third", sample_cache, "train.max_steps=2", "parallel.data=2"),
                          env={"TORCH_EXTENSIONS_DIR": str(cache)}, timeout=600)
    assert "removed a stale build lock" in result.stderr and str(lock) in result.stderr
    assert [row["step"] for row in metrics(tmp_path / "third")] == [1, 2]
    assert (cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists() and not lock.exists()
