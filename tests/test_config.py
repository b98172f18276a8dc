"""Every shipped config composes and validates; bad overrides stop with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import CONF_DIR, describe_keys, load_config
from tests.conftest import REPO

# conf/pipeline/ and conf/finetune/ are the data tools' own config roots (python -m data_tools.pipeline,
# python -m data_tools.finetune); they are composed by their own loaders below and in test_finetune_data.
TOOL_ROOTS = ("pipeline", "finetune")
GROUP_CONFIGS = sorted(
    (path.parent.name, path.stem) for path in CONF_DIR.glob("*/*.yaml") if path.parent.name not in TOOL_ROOTS
)
PIPELINE_EXECUTORS = sorted(path.stem for path in (CONF_DIR / "pipeline" / "executor").glob("*.yaml"))


def test_root_config_validates():
    config = load_config()
    assert isinstance(config, BloomTrainConfig)
    assert config.model.name == "bloom-tiny"
    assert config.logging.wandb.mode == "offline"


@pytest.mark.parametrize("group,name", GROUP_CONFIGS, ids=[f"{g}/{n}" for g, n in GROUP_CONFIGS])
def test_every_shipped_config_composes_and_validates(group, name):
    config = load_config([f"{group}={name}"])
    if group == "model":
        assert config.model.name == name


@pytest.mark.parametrize("executor", PIPELINE_EXECUTORS)
def test_every_pipeline_config_composes_and_validates(executor):
    from data_tools.pipeline.config import load_pipeline_config

    config = load_pipeline_config(["input.paths=[raw/*.jsonl]", "output.dir=out", f"executor={executor}",
                                   "+quality.overrides.fr={min_words:3}", "+language_id.thresholds.en=0.5"])
    assert config.executor.name == executor and config.quality.overrides["fr"]["min_words"] == 3
    with pytest.raises(ConfigError, match="dedup.bands"):
        load_pipeline_config(["input.paths=[raw/*.jsonl]", "output.dir=out", "dedup.bandz=3"])


def test_every_yaml_is_covered():
    yamls = {p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml")}
    pipeline = {Path("pipeline/pipeline.yaml")} | {Path("pipeline/executor") / f"{n}.yaml" for n in PIPELINE_EXECUTORS}
    finetune = {Path("finetune/finetune.yaml"), Path("finetune/preset/nusax_sentiment.yaml")}
    assert yamls == {Path("config.yaml")} | {Path(g) / f"{n}.yaml" for g, n in GROUP_CONFIGS} | pipeline | finetune


def test_published_shapes():
    shapes = {"bloom-560m": (24, 1024, 16), "bloom-1b1": (24, 1536, 16), "bloom-1b7": (24, 2048, 16),
              "bloom-3b": (30, 2560, 32), "bloom-7b1": (30, 4096, 32), "bloom-176b": (70, 14336, 112)}
    for preset, (layers, hidden, heads) in shapes.items():
        model = load_config([f"model={preset}"]).model
        assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (layers, hidden, heads)
        assert model.vocab_size == 250880


def test_overrides_apply():
    config = load_config(["model=bloom-560m", "model.num_layers=2", "train.precision=bf16", "run.dir=/x"])
    assert config.model.num_layers == 2 and config.model.hidden_size == 1024
    assert config.train.precision == "bf16" and config.run.dir == "/x"


@pytest.mark.parametrize("overrides,expected", [
    (["model.num_attention_heads=7", "model.hidden_size=64"], "model.num_attention_heads=7"),
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
    (["+train.foo=3"], "unknown config key 'train.foo'"),
    (["train.max_steps=abc"], "'train.max_steps'"),
    (["model=bloom-9b"], "no model config named 'bloom-9b'; available: bloom-176b"),
    (["experiment=nope"], "no experiment config named 'nope'"),
    (["train.precision=fp8"], "train.precision='fp8'"),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode='cloud'"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
    (["train.max_steps=10", "optimizer.warmup_steps=10"], "optimizer.warmup_steps=10"),
    (["parallel.data=two"], "parallel.data"),
    (["run.name=a", "launch.slurm.sbatch_args=[--qos=high]"], "override 'launch.slurm.sbatch_args=[--qos=high]'"),
])
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_cli_bad_override_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bloomtrain.train", "model.num_attention_heads=7", "model.hidden_size=64",
         f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "model.num_attention_heads" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_help_lists_keys():
    result = subprocess.run([sys.executable, "-m", "bloomtrain.train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "train.global_batch_size=16" in result.stdout and "model=<bloom-176b|" in result.stdout
    assert "logging.wandb.mode=offline" in describe_keys()


def test_every_config_field_is_documented_in_its_schema():
    """A docstring under every field of every schema (``--help`` and docs/configuration.md point there)."""
    import ast

    undocumented = []
    for path in sorted((REPO / "bloomtrain" / "config").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for field, after in zip(node.body, [*node.body[1:], None], strict=True):
                if isinstance(field, ast.AnnAssign) and not (
                        isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    undocumented.append(f"{path.name}: {node.name}.{field.target.id}")
    assert not undocumented, undocumented
