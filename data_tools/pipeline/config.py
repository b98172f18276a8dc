"""The data pipeline's config schema (``python -m data_tools.pipeline key=value ...``), validated once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from bloomtrain.config import WANDB_MODES, ConfigError, WandbConfig, require
from bloomtrain.config_loader import compose_config, to_validated


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)
    """Files or globs: JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, plain text (.txt)."""
    text_field: str = "text"
    id_field: str = "id"
    lang_field: str | None = None
    """A field holding each document's language, when the source labels it (see language_id.trust_source)."""
    max_document_bytes: int = 10_000_000
    """Longer documents are dropped as 'oversized'."""
    shard_megabytes: float = 256
    """Uncompressed JSON Lines (by byte range) and Parquet files (by row groups) larger than this are read by
    several tasks; compressed files are one task each."""

    def __post_init__(self) -> None:
        require(self.shard_megabytes > 0, "input.shard_megabytes must be positive")


@dataclass
class OutputConfig:
    dir: str = ""
    """Everything the pipeline writes lives here: cleaned/, tokenizer/, tokens/ (and tokens/valid/), blend.json,
    report/."""


@dataclass
class ExecutorConfig:
    name: str = "local"
    """local (worker processes on this machine) | slurm (submitit job arrays)."""
    workers: int = 1
    """Local: worker processes. SLURM: array tasks running at once."""
    cluster: str | None = None
    """submitit's cluster: null picks SLURM when sbatch exists; local / debug run the arrays here (tests)."""
    partition: str | None = None
    time_minutes: int = 60
    cpus_per_task: int = 1
    mem_gb: int = 4
    wait: bool = True
    """SLURM: follow the jobs to the end and print the report; false: submit every stage and return at
    once (the stages wait for each other on the cluster; a last job writes the report)."""

    def __post_init__(self) -> None:
        require(self.name in ("local", "slurm"), f"executor={self.name!r} is not local or slurm")
        require(self.workers >= 1, "executor.workers must be >= 1")


@dataclass
class LanguageIdConfig:
    default_threshold: float = 0.0
    """Minimum lid.176 score to keep a document; per-language values in thresholds (the quality step
    also applies ROOTS' per-language language-score cutoffs)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    trust_source: bool = False


@dataclass
class QualityConfig:
    enabled: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    """Per language, fields of data_tools.steps.quality.QualityParameters: {fr: {min_words: 5}}."""
    word_lists_dir: str | None = None
    """Folder with stopwords/<lang>.txt and flagged/<lang>.txt; each replaces that language's packaged list."""
    packaged_word_lists: bool = True
    """Stop words from stopwords-iso, flagged words from LDNOOBW V2 (installed packages); false: the folder alone."""
    perplexity: dict[str, Any] = field(default_factory=dict)
    """Per language, a KenLM filter: {en: {model: PATH, max_perplexity: 1500, sentencepiece: PATH (optional)}}."""

    def __post_init__(self) -> None:
        from data_tools.steps.perplexity import check_perplexity_models
        from data_tools.steps.quality import QualityParameters

        known = {f.name for f in fields(QualityParameters)}
        for language, values in self.overrides.items():
            unknown = set(values or {}) - known
            require(not unknown, f"quality.overrides.{language} has unknown fields {sorted(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
        if self.word_lists_dir:
            folder = Path(self.word_lists_dir).expanduser()
            require(any((folder / kind).is_dir() for kind in ("stopwords", "flagged")),
                    f"quality.word_lists_dir={self.word_lists_dir} holds no stopwords/ or flagged/ folder")
        try:
            check_perplexity_models(dict(self.perplexity))
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    num_perm: int = 128
    bands: int = 25
    rows: int = 5
    ngram: int = 5
    threshold: float = 0.8
    verify_threshold: float | None = None

    def minhash_parameters(self):
        from data_tools.minhash import MinHashParameters

        return MinHashParameters(num_perm=self.num_perm, bands=self.bands, rows=self.rows, ngram=self.ngram,
                                 threshold=self.threshold, verify_threshold=self.verify_threshold)

    def __post_init__(self) -> None:
        require(self.bands * self.rows <= self.num_perm,
                 f"dedup.bands x dedup.rows = {self.bands * self.rows} exceeds dedup.num_perm={self.num_perm}")
        require(0 < self.threshold <= 1, "dedup.threshold must lie in (0, 1]")


@dataclass
class SplitConfig:
    """The held-out validation set, per language (``data_tools/validation_split.py``)."""

    valid_fraction: float = 0.01
    """Share of each language's documents held out for validation."""
    min_valid_documents: int = 1
    """At least this many per language (a language always keeps one training document)."""
    max_valid_documents: int = 1000
    """At most this many per language."""

    def __post_init__(self) -> None:
        require(0 <= self.valid_fraction < 1, "split.valid_fraction must lie in [0, 1)")
        require(self.min_valid_documents >= 0, "split.min_valid_documents must be >= 0")
        require(self.max_valid_documents >= self.min_valid_documents,
                "split.max_valid_documents must be >= split.min_valid_documents")


@dataclass
class TokenizerConfig:
    existing: str | None = None
    """Use this tokenizer instead of training one: a sentencepiece ``.model``, a Hugging Face
    ``tokenizer.json``, or a folder holding either (a Hugging Face BLOOM model folder, a bloomtrain
    checkpoint's ``tokenizer/``)."""
    model_type: str = "bpe"
    """bpe (with byte fallback, as BLOOM) | unigram."""
    vocab_size: int = 4096
    """BLOOM used 250,680; small corpora need small vocabularies."""
    character_coverage: float | None = None
    """Share of the sample's character occurrences whose characters get a vocabulary entry of their own;
    the rest become byte pieces. null: up to 0.9995, with the characters filling at most half of the
    vocabulary, so any mix of scripts fits (what it chose: tokenizer/training.json)."""
    alpha: float = 0.3
    """Temperature of the language-balanced training sample (BLOOM: 0.3)."""
    sample_bytes: int = 200_000_000
    """Size of the training sample."""
    special_tokens: list[str] = field(default_factory=list)
    """Extra tokens kept whole (e.g. [<mask>, <|code|>]), with ids after BLOOM's <unk> <s> </s> <pad> (0-3)."""

    def __post_init__(self) -> None:
        require(self.model_type in ("bpe", "unigram"), f"tokenizer.model_type={self.model_type!r} is not bpe/unigram")
        from data_tools.tokenizer_training import minimum_vocab_size

        smallest = minimum_vocab_size(self.special_tokens)
        require(self.existing is not None or self.vocab_size >= smallest,
                f"tokenizer.vocab_size={self.vocab_size} cannot hold BLOOM's 4 special tokens, the "
                f"{len(self.special_tokens)} of tokenizer.special_tokens and the 256 byte pieces with room for "
                f"characters; use at least {smallest}")
        require(self.character_coverage is None or 0.98 <= self.character_coverage <= 1,
                f"tokenizer.character_coverage={self.character_coverage} must lie in [0.98, 1] (sentencepiece's "
                "range), or be null (chosen to fit the vocabulary)")
        if self.existing:
            from bloomtrain.data.tokenizer import TokenEncoder

            try:
                TokenEncoder(self.existing)
            except ValueError as error:
                raise ConfigError(f"tokenizer.existing: {error}") from None


@dataclass
class BlendConfig:
    alpha: float = 0.3
    """Temperature over token counts for the language mixture (BLOOM: 0.3)."""


@dataclass
class PipelineWandbConfig(WandbConfig):
    """Logging the report (per-language table, charts, totals) to Weights & Biases."""

    mode: str = "disabled"
    """disabled (default) | offline (under output.dir/report/wandb) | online (needs WANDB_API_KEY)."""
    project: str = "bloomtrain-data"

    def __post_init__(self) -> None:
        require(self.mode in WANDB_MODES, f"wandb.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}")


@dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    normalize: bool = True
    pii: bool = True
    language_id: LanguageIdConfig = field(default_factory=LanguageIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    wandb: PipelineWandbConfig = field(default_factory=PipelineWandbConfig)

    def __post_init__(self) -> None:
        require(bool(self.input.paths), "input.paths is empty; give the files to process, e.g. "
                                         "input.paths='[data/*.jsonl.gz]'")
        require(bool(self.output.dir), "output.dir is not set; name the folder the pipeline writes into")


PIPELINE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "pipeline"
ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def load_pipeline_config(overrides: Sequence[str] = ()) -> PipelineConfig:
    """The validated pipeline config for ``overrides``; a ConfigError names the bad key in one line."""
    composed = compose_config(overrides, config_name="pipeline", config_dir=PIPELINE_CONF_DIR, schema=PipelineConfig)
    return to_validated(composed, schema=PipelineConfig)
