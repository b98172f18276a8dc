"""NusaX for lm-eval, read from the files shipped beside this module (no network): sentiment per language
as a three-way multiple choice, and translation between two languages' columns of the parallel corpus.

The task YAMLs name these functions (``custom_dataset: !function nusax.sentiment``); their
``dataset_kwargs`` choose the language or the pair. Languages go by ISO 639-3 code.
"""

from __future__ import annotations

import csv
from pathlib import Path

DATA = Path(__file__).parent / "data"
LANGUAGES = {"ace": "acehnese", "ban": "balinese", "bbc": "toba_batak", "bjn": "banjarese", "bug": "buginese",
             "eng": "english", "ind": "indonesian", "jav": "javanese", "mad": "madurese", "min": "minangkabau",
             "nij": "ngaju", "sun": "sundanese"}
LABELS = ("negative", "neutral", "positive")
SPLITS = {"train": "train", "validation": "valid", "test": "test"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def sentiment(language: str, **_: object):
    """``{"train", "validation", "test"}`` of ``{"id", "text", "label"}`` (label: index into LABELS)."""
    import datasets

    folder = DATA / "sentiment" / LANGUAGES[language]
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([{"id": row["id"], "text": row["text"].strip(),
                                            "label": LABELS.index(row["label"])}
                                           for row in _rows(folder / f"{name}.csv")])
        for split, name in SPLITS.items()})


def translation(source: str, target: str, **_: object):
    """``{"validation", "test"}`` of ``{"source", "target"}`` sentence pairs (the corpus's columns)."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([{"source": row[LANGUAGES[source]].strip(),
                                            "target": row[LANGUAGES[target]].strip()}
                                           for row in _rows(DATA / "mt" / f"{name}.csv")])
        for split, name in SPLITS.items() if split != "train"})


def macro_f1(items: list[tuple[int, int]]) -> float:
    """F1 averaged over the three labels, each weighing the same (lm-eval's own ``f1`` is binary)."""
    from sklearn.metrics import f1_score

    golds, predictions = zip(*items, strict=True)
    return float(f1_score(golds, predictions, labels=list(range(len(LABELS))), average="macro", zero_division=0))
