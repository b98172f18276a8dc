"""Stops and damaged checkpoints (the first wave of faults, kept in the suite): exact resume after
SIGKILL, SIGTERM / SIGUSR1 / SIGINT and the time budget save and exit 75, a torn newest checkpoint falls
back to the previous one, checkpoint contents are never unpickled, the manifest catches damage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bloomtrain.checkpoint import store
from bloomtrain.distributed import free_port
from bloomtrain.metrics import read_metrics
from bloomtrain.preemption import StopRequests
from tests.conftest import REPO, copy_run, run_torchrun, run_train, with_a_given_peak
from tests.faults.helpers import tiny_run


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _start_torchrun(processes: int, overrides: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "bloomtrain.launch.torchrun", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "bloomtrain.train",
               *with_a_given_peak(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.exists() else -1


@pytest.mark.multiprocess
def test_sigkill_then_restart_resumes_exactly(tmp_path, sample_cache):
    steps = 16
    common = ["train.max_steps=16", "checkpoint.interval=4", "checkpoint.keep=0"]
    reference = tmp_path / "uninterrupted"
    run_torchrun(2, tiny_run(reference, sample_cache, *common))

    run_dir = tmp_path / "killed"
    process = _start_torchrun(2, tiny_run(run_dir, sample_cache, *common))
    _wait_for(lambda: _latest_step(run_dir) >= 4 or process.poll() is not None)
    # torchrun and both ranks (torchrun gives them sessions of their own), mid-step, no chance to save.
    subprocess.run(["pkill", "-KILL", "-f", f"run.dir={run_dir}"], check=True)
    process.wait()
    killed_at = _latest_step(run_dir)
    assert 4 <= killed_at < steps, f"the run was not killed mid-way (latest checkpoint step {killed_at})"

    result = run_torchrun(2, tiny_run(run_dir, sample_cache, *common))
    assert f"step_{killed_at}" in result.stderr and "resumed from" in result.stderr
    want, got = read_metrics(reference), read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    for resumed, uninterrupted in zip(got[killed_at:], want[killed_at:], strict=True):
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6, abs=0), resumed["step"]
        assert resumed["consumed_samples"] == uninterrupted["consumed_samples"]
        assert resumed["lr"] == pytest.approx(uninterrupted["lr"], rel=1e-9)


def test_each_stop_signal_is_a_stop_request():
    """SIGTERM (preemption, scancel), SIGUSR1 (SLURM's warning before the time limit) and SIGINT (Ctrl-C) all
    ask for a stop with a checkpoint; the run below shows what a stop request does."""
    before = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt; ignored under a shell's `&`
    stops = StopRequests()
    try:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            stops.received = None
            os.kill(os.getpid(), signum)
            assert stops.received == signal.Signals(signum).name
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.multiprocess
def test_stop_signal_saves_and_exits_75(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    process = _start_torchrun(2, tiny_run(run_dir, sample_cache, "train.max_steps=300", "checkpoint.interval=0"))
    _wait_for(lambda: len(_losses(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False)
    # The ranks alone (torchrun's children), so their own exit status reaches the torchrun wrapper's.
    subprocess.run(["pkill", "-TERM", "-P", str(process.pid)], check=True)
    output, _ = process.communicate(timeout=300)
    last_step = max(_losses(run_dir))
    assert process.returncode == 75, output[-3000:]
    assert "checkpoint saved, exiting with status 75" in output
    assert "rank 0 (exit status 75), rank 1 (exit status 75)" in output
    assert _latest_step(run_dir) == last_step < 300
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == last_step
    assert not store.manifest_problems(run_dir / "checkpoints" / f"step_{last_step}")


@pytest.mark.multiprocess
def test_launcher_passes_the_stop_on_and_exits_75(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "bloomtrain.launch", "launch.processes=2",
               *with_a_given_peak(tiny_run(run_dir, sample_cache, "train.max_steps=300", "checkpoint.interval=0"))]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(_losses(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False)
    process.send_signal(signal.SIGUSR1)  # only the launcher: it must reach the ranks through torchrun
    process.communicate(timeout=300)
    assert process.returncode == 75
    assert _latest_step(run_dir) == max(_losses(run_dir))


@pytest.mark.slow
def test_exit_duration_budget_stops_with_a_checkpoint(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=300", "train.exit_duration_minutes=0.001"),
                       check=False)
    assert result.returncode == 75, result.stderr[-2000:]
    assert "train.exit_duration_minutes=0.001 reached" in result.stdout
    assert _latest_step(run_dir) == 1


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    run_train(tiny_run(run_dir, sample_cache, "train.max_steps=4", "checkpoint.interval=2",
                         "optimizer.decay_steps=8"))
    newest = run_dir / "checkpoints" / "step_4"
    damaged = newest / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a save cut short
    (run_dir / "checkpoints" / "step_6.tmp").mkdir()  # a save that never finished is never considered

    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=6", "checkpoint.interval=2",
                                  "optimizer.decay_steps=8"))
    warning = [line for line in result.stderr.splitlines() if "incomplete or damaged" in line]
    assert len(warning) == 1 and "step_4" in warning[0] and "mp_rank_00_model_states.pt" in warning[0]
    assert "step_2 at step 2" in result.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_nothing_is_unpickled_from_a_checkpoint(tmp_path, sample_cache, checkpointed_run):
    run_dir = copy_run(checkpointed_run, tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "step_2"
    states = checkpoint / "mp_rank_00_model_states.pt"
    planted = tmp_path / "code-ran"
    state = torch.load(states, weights_only=False)
    state["payload"] = _Payload(str(planted))
    torch.save(state, states)
    manifest = json.loads((checkpoint / store.MANIFEST_FILE).read_text())
    manifest["files"][states.name] = {"bytes": states.stat().st_size, "sha256": store.file_digest(states)}
    (checkpoint / store.MANIFEST_FILE).write_text(json.dumps(manifest))

    result = run_train(tiny_run(run_dir, sample_cache, "train.max_steps=4", "optimizer.decay_steps=6"),
                       check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("bloomtrain: checkpoint error:") and "does not unpickle" in error
    assert not planted.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_manifest_catches_truncation_and_corruption(tmp_path):
    directory = tmp_path / "step_1"
    directory.mkdir()
    (directory / "a.pt").write_bytes(b"x" * 1000)
    (directory / "b.pt").write_bytes(b"y" * 10)
    store.write_manifest(directory, {name: store.file_digest(directory / name) for name in store.list_files(directory)})
    assert store.manifest_problems(directory) == []
    (directory / "b.pt").write_bytes(b"z" * 10)
    assert store.manifest_problems(directory) == ["b.pt does not match its checksum"]
    (directory / "a.pt").write_bytes(b"x" * 10)
    assert "a.pt has 10 bytes, the manifest says 1000" in store.manifest_problems(directory)
    (directory / "a.pt").unlink()
    assert "a.pt is missing" in store.manifest_problems(directory)


@pytest.mark.slow
def test_a_stop_during_a_long_evaluation_saves_within_seconds_and_resumes_exactly(tmp_path, sample_cache):
    """SIGTERM while step 2's evaluation runs (16 languages x 100 batches): the evaluation is dropped, not
    half-written; step 2 is saved and the run exits 75 within seconds; the resume continues exactly."""
    common = ("train.max_steps=4", "optimizer.decay_steps=4", "checkpoint.interval=0")
    reference = tmp_path / "reference"
    run_train(tiny_run(reference, sample_cache, *common))

    run_dir = tmp_path / "run"
    overrides = with_a_given_peak(tiny_run(run_dir, sample_cache, *common, "eval.interval=2", "eval.iters=100"))
    process = subprocess.Popen([sys.executable, "-m", "bloomtrain.train", *overrides], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(_losses(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False)
    time.sleep(1.0)  # well inside the evaluation, which takes far longer
    assert not (run_dir / "eval.jsonl").read_text()  # still evaluating
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert time.monotonic() - sent < 30
    assert "stopped after step 2 (SIGTERM); checkpoint saved" in output
    assert _latest_step(run_dir) == 2 and not (run_dir / "eval.jsonl").read_text()

    run_train(tiny_run(run_dir, sample_cache, *common))
    want, got = _losses(reference), _losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
