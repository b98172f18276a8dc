"""Hostile configs: random invalid overrides (hypothesis) all fail in one line naming a key they set,
before any process group, DeepSpeed or megatron-core; the cases only a started run can see (no GPU, a
run directory that cannot be written, a sequence longer than the data) fail the same way from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bloomtrain.config import ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.train import check_run_dir_writable
from tests.conftest import REPO, run_train
from tests.faults.helpers import assert_one_line_error, tiny_run

BAD_VALUES = {
    "train.max_steps": ["0", "-1", "abc", "1.5"],
    "train.micro_batch_size": ["0", "-8"],
    "train.global_batch_size": ["0", "-16"],
    "train.seq_length": ["0", "-1"],
    "train.seed": ["-1"],
    "train.precision": ["fp8", "''"],
    "train.device": ["tpu"],
    "train.peak_tflops": ["0", "-1", "inf", "nan"],
    "train.exit_duration_minutes": ["-1", "inf"],
    "train.max_skipped_steps": ["0"],
    "optimizer.lr": ["0", "-1", "inf", "nan", "-inf"],
    "optimizer.eps": ["0", "-1", "nan"],
    "optimizer.beta1": ["1", "1.5", "-0.1"],
    "optimizer.beta2": ["2"],
    "optimizer.weight_decay": ["-0.1", "inf"],
    "optimizer.grad_clip": ["-1", "inf"],
    "optimizer.decay_style": ["exponential"],
    "parallel.tensor": ["0", "-2"],
    "parallel.pipeline": ["0"],
    "parallel.data": ["x", "0", "-1"],
    "parallel.zero_stage": ["4", "-1"],
    "data.num_workers": ["-1"],
    "eval.iters": ["0"],
    "eval.interval": ["-5"],
    "checkpoint.interval": ["-1"],
    "checkpoint.keep": ["-1"],
    "checkpoint.on_error": ["maybe"],
    "logging.wandb.mode": ["sometimes"],
    "distributed.timeout_minutes": ["0", "-1", "inf", "nan"],
    "launch.nodes": ["0"],
    "launch.processes": ["0"],
    "launch.stop_grace_seconds": ["0"],
    "launcher": ["kubernetes"],
    "run.name": ["../../etc", "a/b", "''", "'x; rm -rf ~'"],
    "train.no_such_key": ["1"],
    "no_such_group.key": ["1"],
}
GOOD_VALUES = ["train.max_steps=50", "optimizer.lr=3e-4", "parallel.zero_stage=2", "data.num_workers=0",
               "checkpoint.interval=10", "optimizer.warmup_steps=5"]

bad_override = st.sampled_from(sorted(BAD_VALUES)).flatmap(
    lambda key: st.sampled_from(BAD_VALUES[key]).map(lambda value: (key, value)))


def _assert_one_line_naming_a_key(overrides: list[str], bad_keys: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    assert any(key in message or key.split(".")[-1] in message for key in bad_keys), message


def test_every_invalid_value_alone_is_one_line_naming_its_key():
    for key, values in BAD_VALUES.items():
        for value in values:
            _assert_one_line_naming_a_key([f"{key}={value}"], [key])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(bad_override, min_size=1, max_size=3, unique_by=lambda item: item[0]),
       good=st.lists(st.sampled_from(GOOD_VALUES), max_size=3, unique=True), bad_first=st.booleans())
def test_invalid_overrides_among_others_are_one_line_naming_a_key(bad, good, bad_first):
    overrides = [f"{key}={value}" for key, value in bad]
    good = [item for item in good if item.split("=")[0] not in dict(bad)]  # a later value would win
    overrides = overrides + good if bad_first else good + overrides
    _assert_one_line_naming_a_key(overrides, [key for key, _ in bad])


@pytest.mark.parametrize("where", ["/proc/bloomtrain-run", "/dev/null/run"])
def test_a_run_directory_that_cannot_be_written_is_a_config_error(where):
    with pytest.raises(ConfigError, match=f"run.dir={where} cannot be written"):
        check_run_dir_writable(where)


def test_the_cli_prints_config_errors_in_one_line_without_starting():
    result = subprocess.run([sys.executable, "-m", "bloomtrain.train", "optimizer.lr=inf", "train.seed=-1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "config error", "must be")


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    pytest.param("train.device=cuda", "train.device=cuda but this machine has no usable CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("run.dir=/proc/bloomtrain-run", "run.dir=/proc/bloomtrain-run cannot be written"),
    ("train.seq_length=1000000", "train.seq_length=1000000 over"),
])
def test_what_only_a_started_run_can_see_is_one_line_too(tmp_path, sample_cache, override, expected):
    result = run_train([*tiny_run(tmp_path / "run", sample_cache), override], check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_line_error(result.stderr, "config error", expected)
