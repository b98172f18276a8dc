"""NaN/Inf in the loss or gradients: skipped steps with the optimizer untouched, a stop after
``train.max_skipped_steps`` in a row, never a checkpoint from inside the streak."""

from __future__ import annotations

import math

import pytest

from bloomtrain.health import EXIT_DIVERGED, NonFiniteSteps
from tests.conftest import run_train
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
