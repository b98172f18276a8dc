"""Secrets stay secret and writes stay inside: a W&B key and any ``*_KEY`` / ``*TOKEN`` variable in the
environment never reach the run's logs, config, metrics, W&B or TensorBoard files or checkpoints, nor the
user's home; a run writes under ``run.dir`` (and the libraries' own caches in the home), and a run name
cannot point its default directory elsewhere."""

from __future__ import annotations

import pytest

from bloomtrain.config import ConfigError
from bloomtrain.config_loader import load_config
from tests.conftest import run_train
from tests.faults.helpers import tiny_run

SECRETS = {"WANDB_API_KEY": "wandbsecret" + "7" * 29, "HF_TOKEN": "hf_secrettokenvalue123",
           "MY_SERVICE_KEY": "servicekey-secret-987"}
LIBRARY_CACHES = (".cache/wandb/logs", ".cache/torch_extensions")  # W&B's debug logs, DeepSpeed's compiled ops


@pytest.mark.slow
def test_secrets_in_the_environment_are_written_nowhere_and_writes_stay_in_the_run(tmp_path, sample_cache):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    from bloomtrain.parallel.cpu import extensions_dir

    # DeepSpeed's compiled ops where every other run finds them (the real home), not compiled again (~30 s).
    compiled_ops = extensions_dir()
    env = {**SECRETS, "WANDB_MODE": "offline", "HOME": str(home), "TORCH_EXTENSIONS_DIR": str(compiled_ops)}
    result = run_train([*tiny_run(run_dir, sample_cache, "train.max_steps=2", "checkpoint.interval=1"),
                        "logging.wandb.mode=offline", "logging.tensorboard=true"], env=env)
    in_run = [path for path in run_dir.rglob("*") if path.is_file()]
    in_home = [path for path in home.rglob("*") if path.is_file()]
    assert any("wandb" in path.parts for path in in_run) and any("checkpoints" in path.parts for path in in_run)
    for path in in_run + in_home:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for value in SECRETS.values():
        assert value not in result.stdout + result.stderr
    outside = [path for path in in_home if not str(path.relative_to(home)).startswith(LIBRARY_CACHES)]
    assert not outside, outside


@pytest.mark.parametrize("name", ["../../etc", "a/b", "x; rm -rf ~", ".hidden", ""])
def test_a_run_name_is_a_name_not_a_path(name):
    with pytest.raises(ConfigError, match="must be a plain name"):
        load_config([f"run.name='{name}'"])
