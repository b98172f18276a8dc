"""An optional perplexity filter with KenLM models the user supplies, one per language (as ROOTS and CCNet).

Configured per language: ``+quality.perplexity.en={model:/lm/en.arpa.bin,max_perplexity:1500}``, with
an optional ``sentencepiece: /lm/en.sp.model`` when the model was trained on sentencepiece pieces
(CCNet's published Wikipedia models were). A document's perplexity is taken over its lines, each
scored as a sentence (``<s> ... </s>``), after CCNet's normalisation: lower case, accents removed,
digits as 0, punctuation dropped; without sentencepiece, words are split on spaces (characters in
scripts without spaces). Documents above the language's ``max_perplexity`` are dropped as
``high_perplexity``; languages without a model pass, counted as ``perplexity_unchecked``.

Needs the ``kenlm`` module: ``pip install 'bloomtrain[kenlm]'`` (the ``kenlm-ex`` wheels).
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from data_tools.steps.base import Document, DocumentFilter
from data_tools.text import NO_SPACE_LANGUAGES

# Unicode general categories of punctuation and symbols.
_DROPPED_CATEGORIES = ("P", "S")


def normalise_for_lm(line: str) -> str:
    """CCNet's normalisation of text before KenLM: lower case, no accents, digits as 0, no punctuation."""
    decomposed = unicodedata.normalize("NFD", line.lower())
    kept = []
    for char in decomposed:
        category = unicodedata.category(char)
        if category == "Mn":  # combining accent
            continue
        if category == "Nd":
            kept.append("0")
        elif category[0] in _DROPPED_CATEGORIES:
            kept.append(" ")
        else:
            kept.append(char)
    return " ".join("".join(kept).split())


def document_perplexity(model, text: str, language: str, pieces=None) -> float:
    """10 ** (-log10 probability per token) over the document's lines; ``inf`` with nothing to score."""
    log10_total, tokens = 0.0, 0
    for line in text.splitlines():
        normalised = normalise_for_lm(line)
        if not normalised:
            continue
        if pieces is not None:
            words = pieces.encode(normalised, out_type=str)
        elif language in NO_SPACE_LANGUAGES:
            words = [char for char in normalised if not char.isspace()]
        else:
            words = normalised.split()
        log10_total += model.score(" ".join(words), bos=True, eos=True)
        tokens += len(words) + 1  # the end of sentence is predicted too
    return 10 ** (-log10_total / tokens) if tokens else math.inf


def check_perplexity_models(models: dict[str, Any]) -> None:
    """Raise ValueError naming the key of a bad entry (run at config time, before any work)."""
    from pathlib import Path

    for language, entry in models.items():
        key = f"quality.perplexity.{language}"
        if not isinstance(entry, dict) or "model" not in entry or "max_perplexity" not in entry:
            raise ValueError(f"{key} needs {{model: PATH, max_perplexity: NUMBER}} "
                             "(and optionally sentencepiece: PATH)")
        unknown = set(entry) - {"model", "max_perplexity", "sentencepiece"}
        if unknown:
            raise ValueError(f"{key} has unknown fields {sorted(unknown)}; use model, max_perplexity, sentencepiece")
        for field in ("model", "sentencepiece"):
            if entry.get(field) and not Path(entry[field]).expanduser().is_file():
                raise ValueError(f"{key}.{field}: {entry[field]} does not exist")
        if not float(entry["max_perplexity"]) > 0:
            raise ValueError(f"{key}.max_perplexity must be positive")
    if models:
        try:
            import kenlm  # noqa: F401
        except ImportError:
            raise ValueError("quality.perplexity needs the kenlm module: pip install 'bloomtrain[kenlm]'") from None


class PerplexityFilter(DocumentFilter):
    name = "perplexity"

    def __init__(self, models: dict[str, Any]) -> None:
        import kenlm

        super().__init__()
        self.models, self.limits, self.pieces = {}, {}, {}
        for language, entry in models.items():
            self.models[language] = kenlm.Model(str(entry["model"]))
            self.limits[language] = float(entry["max_perplexity"])
            if entry.get("sentencepiece"):
                import sentencepiece as spm

                self.pieces[language] = spm.SentencePieceProcessor(model_file=str(entry["sentencepiece"]))

    def reject_reason(self, document: Document) -> str | None:
        language = document.language
        if language not in self.models:
            self.stats.count("perplexity_unchecked")
            return None
        perplexity = document_perplexity(self.models[language], document.text, language, self.pieces.get(language))
        document.meta["perplexity"] = perplexity
        return "high_perplexity" if perplexity > self.limits[language] else None
