"""NaN/Inf in the loss or gradients: skipped steps with the optimizer untouched, a stop after
``train.max_skipped_steps`` in a row, never a checkpoint from inside the streak. Loss spikes: a rollback
to the newest checkpoint that passes over the data read since, kept across a resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bloomtrain.health import EXIT_DIVERGED, LossSpikes, NonFiniteSteps
from tests.conftest import REPO, run_train
from tests.faults.helpers import assert_one_line_error, latest, metrics, tiny_run


def test_a_streak_of_non_finite_steps_stops_the_run():
    steps = NonFiniteSteps(max_in_a_row=3)
    assert not steps.record(1, 2.0, 1.0, loss_scaling=False)
    assert not steps.record(2, math.nan, math.inf, loss_scaling=False)
    assert not steps.record(3, 2.0, math.inf, loss_scaling=False)  # finite loss, Inf gradient: still bad
    assert not steps.record(4, 2.0, 0.5, loss_scaling=False)  # a good step ends the streak
    assert (steps.in_a_row, steps.total) == (0, 2)
    assert [steps.record(step, math.inf, None, loss_scaling=False) for step in (5, 6, 7)] == [False, False, True]
    assert steps.first_step == 5


def test_fp16_overflows_are_loss_scaling_not_faults():
    steps = NonFiniteSteps(max_in_a_row=1)
    assert not steps.record(1, 3.0, math.inf, loss_scaling=True)  # DeepSpeed lowers the scale and goes on
    assert steps.record(2, math.nan, None, loss_scaling=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=0"], ["parallel.zero_stage=1", "train.precision=bf16"]],
                         ids=["fp32-zero0", "bf16-zero1"])
def test_a_diverging_run_skips_its_nan_steps_then_stops_with_its_last_good_checkpoint(tmp_path, sample_cache, layout):
    run_dir = tmp_path / "run"
    # lr=1e6: the first step blows the weights up (finite), every step after has a NaN loss.
    result = run_train(tiny_run(run_dir, sample_cache, "optimizer.lr=1e6", "train.max_steps=20",
                                "train.max_skipped_steps=3", "checkpoint.interval=1", *layout), check=False)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    line = assert_one_line_error(result.stdout + result.stderr, "training diverged", "steps 2-4",
                                 "train.max_skipped_steps=3", "optimizer.lr")
    assert "checkpoints/step_1" in line
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert math.isfinite(rows[0]["loss"]) and all(math.isnan(row["loss"]) for row in rows[1:])
    assert [row["nonfinite_steps"] for row in rows] == [0, 1, 2, 3]
    # Skipped means untouched: the weights' norm does not move over the NaN steps.
    assert len({row["param_norm"] for row in rows}) == 1 and math.isfinite(rows[0]["param_norm"])
    # Nothing from inside the streak was published.
    assert latest(run_dir) == "step_1"
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step_*")) == ["step_1"]


def test_a_loss_above_the_factor_times_the_recent_highest_is_a_spike():
    spikes = LossSpikes(factor=2.0, window=3)
    assert not any(spikes.is_spike(loss) for loss in (9.0, 5.0, 4.0))  # arming: the window fills first
    assert not spikes.is_spike(17.9)  # below 2 x 9
    assert spikes.is_spike(40.0)  # above 2 x 17.9, and not taken into the window
    assert max(spikes.recent) == 17.9


def _spiky(run_dir, cache, *extra: str) -> list[str]:
    return tiny_run(run_dir, cache, "optimizer.decay_steps=8", "checkpoint.interval=2", "train.loss_spike_factor=1.5",
                    "train.loss_spike_window=3", "train.inject_loss_spike_at=[5]", *extra)


@pytest.mark.slow
def test_a_loss_spike_rolls_back_skips_the_data_read_since_and_a_resume_keeps_skipping(tmp_path, sample_cache):
    plain = tmp_path / "plain"
    run_train(tiny_run(plain, sample_cache, "optimizer.decay_steps=8", "train.max_steps=8", "checkpoint.interval=2"))
    spiky = tmp_path / "spiky"
    result = run_train(_spiky(spiky, sample_cache, "train.max_steps=8"))
    assert ("bloomtrain: loss spike at step 5: loss" in result.stdout and "rolled back to step_4 and passed over "
            "the 16 samples read since (rollback 1 of 3)" in result.stdout)
    rows, plain_rows = metrics(spiky), metrics(plain)
    assert [row["step"] for row in rows] == list(range(1, 9))  # the rolled-back step is not logged twice
    assert [row["loss"] for row in rows[:4]] == [row["loss"] for row in plain_rows[:4]]
    # Step 5 is re-done from step 4's weights on the samples after the skipped ones: not the same loss.
    assert rows[4]["loss"] != plain_rows[4]["loss"] and rows[4]["consumed_samples"] == 80
    progress = json.loads((spiky / "checkpoints" / "step_8" / "meta.json").read_text())["progress"]
    assert (progress["skipped_samples"], progress["loss_spikes"], progress["consumed_samples"]) == (16, 1, 128)

    # Stopped after the rollback and resumed: the checkpoint carries the skip, the losses continue exactly.
    resumed = tmp_path / "resumed"
    run_train(_spiky(resumed, sample_cache, "train.max_steps=6"))
    run_train(_spiky(resumed, sample_cache, "train.max_steps=8"))
    assert [row["loss"] for row in metrics(resumed)] == [row["loss"] for row in rows]


@pytest.mark.slow
def test_a_spike_with_no_rollback_left_stops_the_run(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    result = run_train(_spiky(run_dir, sample_cache, "train.max_steps=8", "train.loss_spike_max_rollbacks=0"),
                       check=False)
    assert result.returncode == EXIT_DIVERGED
    line = assert_one_line_error(result.stdout, "training diverged: loss spike at step 5",
                                 "train.loss_spike_max_rollbacks=0 used up")
    assert "Stopping with nothing saved after it" in line
    assert latest(run_dir) == "step_4"


@pytest.mark.slow
def test_a_run_ending_inside_a_short_streak_exits_3_and_one_that_recovers_exits_0(tmp_path, sample_cache):
    """Exit 0 only with a checkpoint of healthy weights: lr=1e6 makes steps 2-6 NaN, fewer than
    train.max_skipped_steps=10, so only the end of the run can tell; through the launcher, as a job runs it."""
    diverged = tmp_path / "diverged"
    result = subprocess.run([sys.executable, "-m", "bloomtrain.launch", "launch.processes=1",
                             *tiny_run(diverged, sample_cache, "optimizer.lr=1e6", "train.max_steps=6",
                                       "checkpoint.interval=0")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    assert_one_line_error(result.stdout + result.stderr, "training diverged",
                          "the run ended inside a streak of 5 NaN/Inf steps (steps 2-6", "no checkpoint was saved",
                          "optimizer.lr")
    assert json.loads((diverged / "stopped.json").read_text())["exit_status"] == EXIT_DIVERGED
    assert not (diverged / "checkpoints" / "latest").exists()

    # Steps 3 and 4 skipped (the guard sees NaN there), then healthy again: exit 0, saved at the end.
    recovered = tmp_path / "recovered"
    result = run_train(tiny_run(recovered, sample_cache, "train.max_steps=6", "checkpoint.interval=0",
                                "train.inject_nonfinite_at=[3,4]"))
    assert [row["nonfinite_steps"] for row in metrics(recovered)] == [0, 0, 1, 2, 2, 2]
    assert latest(recovered) == "step_6" and "training diverged" not in result.stdout + result.stderr
