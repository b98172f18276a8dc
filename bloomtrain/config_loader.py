"""Compose ``conf/`` with command-line overrides through Hydra, then validate once.

We call Hydra's compose API rather than ``@hydra.main`` so that every entry point (train, launch,
tests) composes the same way and a bad override ends in one line that names the key, instead of
Hydra's multi-line report or a traceback from inside OmegaConf.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bloomtrain.config import BloomTrainConfig, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_NAME = "bloomtrain_schema"

ConfigStore.instance().store(name=SCHEMA_NAME, node=BloomTrainConfig)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: Path = CONF_DIR,
                   schema: type = BloomTrainConfig) -> DictConfig:
    """Compose ``<config_dir>/<config_name>.yaml`` with ``overrides``; raise ConfigError on a bad override."""
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_unparsable(overrides) or _explain(error, schema)) from None


def _unparsable(overrides: Sequence[str]) -> str | None:
    """Hydra's grammar error does not say which override broke it; find the first that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException as error:
            key = override.split("=", 1)[0]
            return (f"cannot read the override '{override}' ({str(error).splitlines()[0]}); quote values "
                    f"holding '=', ',', spaces or brackets for Hydra, e.g. '{key}=[\"--a=b\"]'")
    return None


def load_config(overrides: Sequence[str] = ()) -> BloomTrainConfig:
    """The validated training config for ``overrides`` (``key=value`` / ``group=name`` strings)."""
    composed = compose_config(overrides)
    return to_validated(composed)


def to_validated(composed: DictConfig, schema: type = BloomTrainConfig):
    """Resolve interpolations and run every dataclass's ``__post_init__`` validation."""
    structured = OmegaConf.structured(schema)
    known = set(_all_keys(structured))
    free = _free_dicts(structured)
    for key in _all_keys(composed):
        if key not in known and not any(key.startswith(prefix + ".") for prefix in free):
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, schema)}")
    try:
        config = OmegaConf.to_object(composed)
    except OmegaConfBaseException as error:
        raise ConfigError(_explain(error, schema)) from None
    assert isinstance(config, schema)
    return config


def _free_dicts(node: DictConfig, prefix: str = "") -> list[str]:
    """Paths of free-form dict fields (e.g. ``quality.overrides``): the keys under them are the user's."""
    found = []
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                found.append(f"{prefix}{key}")
            else:
                found.extend(_free_dicts(child, f"{prefix}{key}."))
    return found


def to_yaml(config: BloomTrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _explain(error: Exception, schema: type = BloomTrainConfig) -> str:
    """Turn Hydra/OmegaConf's error chain into one line that names the key and the fix."""
    messages = []
    current: BaseException | None = error
    while current is not None:
        messages.append(str(current))
        current = current.__cause__ or current.__context__
    text = "\n".join(messages)

    full_key = _search(r"full_key: ([\w.]+)", text)
    if re.search(r"Key '[^']*' (not in|is not in struct)", text):
        key = full_key or _search(r"Could not override '([\w.]+)'", text) or "?"
        return f"unknown config key '{key}'{_suggest(key, schema)}"
    if "could not be converted" in text or re.search(r"Value '[^']*' is not a", text):
        value = _search(r"Value '([^']*)'", text)
        wanted = _search(r"converted to (\w+)", text) or _search(r"is not a (\w+)", text)
        return f"bad value {value!r} for '{full_key}': expected {wanted or 'another type'}"
    missing = re.search(r"Could not find '([\w/.-]+)'.*?Available options in '[\w/]+':\s*(.*?)\nConfig search",
                        text, re.S)
    if missing:
        group, _, name = missing.group(1).rpartition("/")
        return f"no {group} config named '{name}'; available: {', '.join(missing.group(2).split())}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first_line


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _suggest(full_key: str, schema: type = BloomTrainConfig) -> str:
    """' (did you mean ...?)' from the schema's own keys."""
    known = _all_keys(OmegaConf.structured(schema))
    close = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else "; run with --help to list the keys"


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(_all_keys(child, path + "."))
        else:
            keys.append(path)
    return keys


def describe_keys() -> str:
    """Every config key with its default, for ``--help``."""
    schema = OmegaConf.structured(BloomTrainConfig)
    lines = []
    for key in _all_keys(schema):
        value = OmegaConf.select(schema, key, throw_on_missing=False)
        lines.append(f"  {key}={value}")
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "pipeline")
    for group in groups:
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}=<{'|'.join(names)}>")
    return "\n".join(lines)
