"""Per-language quality filters with ROOTS' parameters as defaults (BigScience OSCAR filtering).

Checks, each dropping a document under its own reason: word count (``too_few_words``,
``too_many_words``), character repetition over n-grams (10, or 3 for Chinese: ``character_repetition``),
word repetition over 5-grams (``word_repetition``), special-character ratio (``special_characters``),
stop-word ratio (``too_few_stopwords``), flagged-word ratio (``flagged_words``) and the language-id
score (``low_language_score``). Thresholds per language come from :data:`ROOTS_PARAMETERS` and can be
overridden per language (``+quality.overrides.fr={word_repetition_max:0.2}`` on the command line).

Stop-word and flagged-word lists come packaged (stopwords-iso; LDNOOBW V2) or from
``quality.word_lists_dir``, see ``word_lists.py``. Where a language has no list, that check is skipped
and counted (``stopwords_unchecked``/``flagged_unchecked``).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from data_tools.steps.base import Document, DocumentFilter
from data_tools.steps.word_lists import load_word_lists
from data_tools.text import NO_SPACE_LANGUAGES, POLYNOMIAL_HASH_BASE

SPECIAL_CHARACTERS = frozenset(
    string.punctuation + string.digits + string.whitespace
    + "　￼’“”–ー一▬…✦�£•€«»°·═×士＾˘⇓↓↑←→（）§″′´¿−±∈¢ø‚„½¼¾¹²³―⁃，ˌ¸‹›ʺˈʻ¦‐⠀‰‑≤≥‖"
    + "◆●■►▼▲▴∆▻¡★☆✱ːº。¯˜¥ɪ≈†：∼⁄・♡✓⊕․．⋅÷１‟；،、¨◦˚゜ʼ≖¤℃√！【】‿∞➤～π۩☛₨➩☻๑٪♥ıॽ《‘©﴿٬？▷♫∟™ª₪®「—❖」﴾》"
)
_SPECIAL_STRING = "".join(sorted(SPECIAL_CHARACTERS))  # str.strip's argument, built once
_SPECIAL_PATTERN = re.compile("[" + re.escape(_SPECIAL_STRING) + "]")


@dataclass(frozen=True)
class QualityParameters:
    min_words: int = 10
    max_words: int = 100_000
    char_repetition_length: int = 10
    char_repetition_max: float = 0.2
    word_repetition_length: int = 5
    word_repetition_max: float = 0.3
    special_characters_max: float = 0.4
    stopwords_min: float = 0.1
    flagged_words_max: float = 0.1
    lang_score_min: float = 0.70


def _roots(**values) -> QualityParameters:
    return replace(QualityParameters(), **values)


# The thresholds ROOTS used to filter OSCAR (BigScience data-preparation, parameters_filtering.py).
ROOTS_PARAMETERS: dict[str, QualityParameters] = {
    "default": QualityParameters(),
    "ar": _roots(min_words=20, word_repetition_max=0.34, special_characters_max=0.30, stopwords_min=0.07,
                 flagged_words_max=0.03, lang_score_min=0.81),
    "bn": _roots(min_words=33, char_repetition_max=0.13, word_repetition_max=0.21, special_characters_max=0.45,
                 stopwords_min=0.002, flagged_words_max=0.001, lang_score_min=0.95),
    "ca": _roots(min_words=15, word_repetition_max=0.4, special_characters_max=0.25, stopwords_min=0.25,
                 lang_score_min=0.8),
    "en": _roots(min_words=20, char_repetition_max=0.106, word_repetition_max=0.19, stopwords_min=0.3,
                 flagged_words_max=0.01, lang_score_min=0.80),
    "es": _roots(min_words=16, char_repetition_max=0.14, word_repetition_max=0.25, special_characters_max=0.34,
                 stopwords_min=0.4, flagged_words_max=0.01, lang_score_min=0.8),
    "eu": _roots(min_words=8, word_repetition_max=0.40, special_characters_max=0.31, stopwords_min=0.05),
    "fr": _roots(min_words=13, char_repetition_max=0.14, word_repetition_max=0.13, special_characters_max=0.34,
                 stopwords_min=0.27, flagged_words_max=0.008, lang_score_min=0.8),
    "hi": _roots(min_words=38, char_repetition_max=0.18, word_repetition_max=0.47, special_characters_max=0.45,
                 stopwords_min=0.01, flagged_words_max=0.005, lang_score_min=0.90),
    "id": _roots(min_words=15, char_repetition_max=0.15, word_repetition_max=0.20, special_characters_max=0.34,
                 stopwords_min=0.15, flagged_words_max=0.01),
    "pt": _roots(min_words=19, char_repetition_max=0.25, word_repetition_max=0.98, special_characters_max=0.35,
                 stopwords_min=0.2, flagged_words_max=0.007, lang_score_min=0.6),
    "ur": _roots(min_words=25, char_repetition_max=0.19, word_repetition_length=7, word_repetition_max=0.5,
                 special_characters_max=0.25, stopwords_min=0.01, flagged_words_max=0.025, lang_score_min=0.90),
    "vi": _roots(min_words=30, char_repetition_max=0.15, word_repetition_max=0.20, special_characters_max=0.34,
                 stopwords_min=0.08, flagged_words_max=0.005, lang_score_min=0.90),
    "zh": _roots(min_words=1, max_words=1_000_000, char_repetition_length=3, char_repetition_max=0.2,
                 word_repetition_max=0.96, special_characters_max=0.3, stopwords_min=0.1691,
                 flagged_words_max=0.001, lang_score_min=0.85),
}


def words_of(text: str, language: str) -> list[str]:
    """Words with special characters stripped from their ends; characters for scripts without spaces."""
    if language in NO_SPACE_LANGUAGES:
        return [c for c in text if c not in SPECIAL_CHARACTERS]
    stripped = (word.strip(_SPECIAL_STRING) for word in text.split())
    return [word for word in stripped if word]


def character_repetition_ratio(text: str, n: int) -> float:
    """ROOTS: share of the n-gram occurrences taken by the sqrt(#distinct)-most frequent repeated n-grams.

    N-grams are counted by 64-bit polynomial hashes of their code points, in NumPy: the same counts as
    a Counter of substrings (a collision needs two distinct n-grams of one document to share 64 bits),
    at a third of the time; this check was the costliest of the clean stage."""
    if len(text) < n:
        return 0.0
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    powers = POLYNOMIAL_HASH_BASE ** np.arange(n - 1, -1, -1, dtype=np.uint64)  # wraps modulo 2**64, as intended
    hashes = sliding_window_view(code_points, n) @ powers
    _, counts = np.unique(hashes, return_counts=True)
    top = max(int(math.sqrt(len(counts))), 1)
    repeated = np.sort(counts[counts > 1])[::-1][:top]
    return float(repeated.sum()) / len(hashes)


def word_repetition_ratio(words: list[str], n: int) -> float:
    """ROOTS: share of word n-gram occurrences that belong to n-grams seen more than once."""
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return sum(count for count in grams.values() if count > 1) / total if total else 0.0


def special_character_ratio(text: str) -> float:
    return len(_SPECIAL_PATTERN.findall(text)) / len(text) if text else 0.0


class QualityFilter(DocumentFilter):
    name = "quality"

    def __init__(self, overrides: dict[str, dict[str, float]] | None = None, word_lists_dir: str | None = None,
                 packaged_word_lists: bool = True, check_language_score: bool = True) -> None:
        super().__init__()
        self.parameters = dict(ROOTS_PARAMETERS)
        for language, values in (overrides or {}).items():
            base = self.parameters.get(language, self.parameters["default"])
            self.parameters[language] = replace(base, **values)
        self.stopwords = load_word_lists("stopwords", word_lists_dir, packaged_word_lists, NO_SPACE_LANGUAGES)
        self.flagged = load_word_lists("flagged", word_lists_dir, packaged_word_lists, NO_SPACE_LANGUAGES)
        self.check_language_score = check_language_score

    def parameters_for(self, language: str) -> QualityParameters:
        return self.parameters.get(language, self.parameters["default"])

    def reject_reason(self, document: Document) -> str | None:
        language, text = document.language, document.text
        limits = self.parameters_for(language)
        words = words_of(text, language)
        if len(words) < limits.min_words:
            return "too_few_words"
        if len(words) > limits.max_words:
            return "too_many_words"
        if character_repetition_ratio(text, limits.char_repetition_length) > limits.char_repetition_max:
            return "character_repetition"
        if word_repetition_ratio(words, limits.word_repetition_length) > limits.word_repetition_max:
            return "word_repetition"
        if special_character_ratio(text) > limits.special_characters_max:
            return "special_characters"
        lowered = [word.lower() for word in words]
        if language in self.stopwords:
            if self.stopwords[language].share(lowered) < limits.stopwords_min:
                return "too_few_stopwords"
        else:
            self.stats.count("stopwords_unchecked")
        if language in self.flagged:
            if self.flagged[language].share(lowered) > limits.flagged_words_max:
                return "flagged_words"
        else:
            self.stats.count("flagged_unchecked")
        if self.check_language_score and document.lang_score is not None and \
                document.lang_score < limits.lang_score_min:
            return "low_language_score"
        return None
