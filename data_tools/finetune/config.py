"""The schema of ``python -m data_tools.finetune key=value ...``, validated once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from bloomtrain.config import require
from bloomtrain.config_loader import compose_config, to_validated

SPLITS = ("train", "valid", "test")
FORMATS = ("auto", "inputs_targets", "prompt_response", "messages", "template")


@dataclass
class SourceConfig:
    """One dataset of the blend: a task (in a language) read from JSON Lines or CSV files."""

    name: str = ""
    """Its name in the blend and in the report, e.g. nusax_sentiment_ind."""
    train: list[str] = field(default_factory=list)
    """Files (or globs) of training records: .jsonl or .csv."""
    valid: list[str] = field(default_factory=list)
    """Given validation records; empty: split.valid_fraction of train is held out."""
    test: list[str] = field(default_factory=list)
    """Given test records; empty: split.test_fraction of train is held out."""
    prompt: str | None = None
    """A template over a record's fields, e.g. 'Text: {text}\\nSentiment:'; null: the record says
    ({inputs, targets}, {prompt, response} or {messages})."""
    target: str | None = None
    """The template of the answer, e.g. ' {label}' (the loss is taken on it and the EOS after it)."""
    weight: float = 1.0
    """Its share of training samples, relative to the other sources."""
    format: str = "auto"
    """auto (from each record's fields) | inputs_targets | prompt_response | messages | template (the
    prompt and target templates): a record not in the named format is counted as missing_field."""

    def __post_init__(self) -> None:
        require(bool(self.name), "every source needs a name (sources[].name)")
        require(bool(self.train), f"source {self.name}: train lists no files")
        require((self.prompt is None) == (self.target is None),
                f"source {self.name}: give both prompt and target templates, or neither")
        require(self.weight > 0, f"source {self.name}: weight must be positive")
        require(self.format in FORMATS, f"source {self.name}: format={self.format!r} is not one of {FORMATS}")
        require((self.format == "template") == (self.prompt is not None) or self.format == "auto",
                f"source {self.name}: format=template goes with the prompt and target templates, and only it")


@dataclass
class InputConfig:
    """One source given by keys instead of a ``sources`` entry: ``input.paths=[...] input.format=...``."""

    paths: list[str] = field(default_factory=list)
    """Training records (.jsonl or .csv files or globs); empty: only ``sources`` are read."""
    valid_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    format: str = "auto"
    """auto | inputs_targets | prompt_response | messages | template (with input.prompt and input.target)."""
    prompt: str | None = None
    target: str | None = None
    name: str = "task"
    """Its name in the blend, the report and the training run's metrics."""
    weight: float = 1.0

    def as_source(self) -> SourceConfig:
        return SourceConfig(self.name, list(self.paths), list(self.valid_paths), list(self.test_paths),
                            self.prompt, self.target, self.weight, self.format)


@dataclass
class TokenizerConfig:
    path: str = ""
    """The model's tokenizer: a bloomtrain run or checkpoint (its tokenizer/), a sentencepiece model, a
    tokenizer.json or a Hugging Face folder."""


@dataclass
class SplitConfig:
    valid_fraction: float = 0.05
    """Share of a source's train records held out for validation when it gives no valid files."""
    test_fraction: float = 0.05
    """Share held out for the test split when it gives no test files."""

    def __post_init__(self) -> None:
        require(0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1
                and self.valid_fraction + self.test_fraction < 1,
                "split.valid_fraction and split.test_fraction must be in [0, 1) and sum to less than 1")


@dataclass
class FinetuneOutputConfig:
    dir: str = ""
    """Everything is written here: tokenizer/, tokens/<split>/<source>(.loss_mask).bin/.idx, blend.json,
    report.json."""


@dataclass
class FinetuneConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The datasets; conf/finetune/preset/ has presets (preset=nusax_sentiment)."""
    input: InputConfig = field(default_factory=InputConfig)
    """One more source, given by keys (input.paths=[...]); added after ``sources``."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_length: int = 2048
    """Longest example (prompt, target and EOS) kept: the training run's train.seq_length."""
    output: FinetuneOutputConfig = field(default_factory=FinetuneOutputConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        if self.input.paths:
            self.sources = [*self.sources, self.input.as_source()]
        require(bool(self.sources), "no data: give input.paths=[...], pick a preset (preset=nusax_sentiment) or "
                                    "list sources")
        require(bool(self.tokenizer.path), "tokenizer.path is not set; give the model's tokenizer (a run, "
                                           "checkpoint, sentencepiece model or tokenizer.json)")
        require(bool(self.output.dir), "output.dir is not set; name the folder to write into")
        require(self.seq_length >= 2, "seq_length must be >= 2")
        names = [source.name for source in self.sources]
        require(len(set(names)) == len(names), f"source names repeat: {names}")


FINETUNE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "finetune"
ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


def load_finetune_config(overrides: Sequence[str] = ()) -> FinetuneConfig:
    composed = compose_config(overrides, config_name="finetune", config_dir=FINETUNE_CONF_DIR,
                              schema=FinetuneConfig)
    return to_validated(composed, schema=FinetuneConfig)
