"""Secrets stay secret: a W&B key and any ``*_KEY`` / ``*TOKEN`` variable in the environment never reach
the run's logs, config, metrics, W&B files, TensorBoard events or checkpoints."""

from __future__ import annotations

import pytest

from tests.conftest import run_train
from tests.faults.helpers import tiny_run

SECRETS = {"WANDB_API_KEY": "wandbsecret" + "7" * 29, "HF_TOKEN": "hf_secrettokenvalue123",
           "MY_SERVICE_KEY": "servicekey-secret-987"}


@pytest.mark.slow
def test_secrets_in_the_environment_are_written_nowhere(tmp_path, sample_cache):
    run_dir = tmp_path / "run"
    # W&B offline: with a key in the environment it must still not store it.
    result = run_train([*tiny_run(run_dir, sample_cache, "train.max_steps=2", "checkpoint.interval=1"),
                        "logging.wandb.mode=offline", "logging.tensorboard=true"],
                       env={**SECRETS, "WANDB_MODE": "offline"})
    written = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any("wandb" in path.parts for path in written) and any("checkpoints" in path.parts for path in written)
    for path in written:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for value in SECRETS.values():
        assert value not in result.stdout + result.stderr
