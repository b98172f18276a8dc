"""Typed configuration: the dataclass schemas Hydra composes into, one module per slice with its checks.

YAML files under ``conf/`` only fill in values; every field is documented in its schema. Validation
runs once, in ``__post_init__``, when :func:`bloomtrain.config_loader.load_config` turns the composed
OmegaConf tree into these objects. A user error raises :class:`ConfigError` naming the key and the fix.

| slice | module |
|---|---|
| ``model`` | ``model.py`` |
| ``train``, ``optimizer`` | ``training.py`` |
| ``parallel``, ``distributed`` | ``parallel.py`` |
| ``data``, ``eval`` | ``data.py`` |
| ``run``, ``checkpoint``, ``logging`` | ``run.py`` |
| ``launch``, ``launcher`` | ``launch.py`` |
| the root and the checks across slices | ``root.py`` |
"""

from bloomtrain.config.data import DataConfig, EvalConfig
from bloomtrain.config.errors import ConfigError, require
from bloomtrain.config.launch import LaunchConfig, SlurmLaunchConfig
from bloomtrain.config.model import ModelConfig
from bloomtrain.config.parallel import DistributedConfig, ParallelConfig
from bloomtrain.config.root import BloomTrainConfig
from bloomtrain.config.run import WANDB_MODES, CheckpointConfig, LoggingConfig, RunConfig, WandbConfig
from bloomtrain.config.training import LR_DECAY_STYLES, PRECISIONS, OptimizerConfig, TrainConfig
from bloomtrain.gpus import PLANNED_GPUS

__all__ = [
    "BloomTrainConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig",
    "LaunchConfig", "LoggingConfig", "LR_DECAY_STYLES", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "PLANNED_GPUS", "PRECISIONS", "RunConfig", "SlurmLaunchConfig", "TrainConfig", "WANDB_MODES", "WandbConfig",
    "require",
]
