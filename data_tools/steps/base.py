"""What every step shares: the document, per-language statistics, and the step and filter interfaces."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

UNKNOWN_LANGUAGE = "unknown"


@dataclass
class Document:
    """One document in flight. ``meta`` carries what steps add (e.g. PII counts, quality scores)."""

    id: str
    text: str
    lang: str | None = None
    lang_score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def language(self) -> str:
        return self.lang or UNKNOWN_LANGUAGE

    def to_json(self) -> dict[str, Any]:
        record = {"id": self.id, "text": self.text, "lang": self.language}
        if self.lang_score is not None:
            record["lang_score"] = round(self.lang_score, 4)
        return record


def _counter() -> dict[str, int]:
    return {"documents": 0, "bytes": 0}


@dataclass
class StepStats:
    """Per language: documents and bytes in and out, and documents dropped per named reason."""

    step: str
    inputs: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(_counter))
    outputs: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(_counter))
    dropped: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record_in(self, document: Document) -> None:
        _add(self.inputs[document.language], document)

    def record_out(self, document: Document) -> None:
        _add(self.outputs[document.language], document)

    def record_drop(self, reason: str, language: str = UNKNOWN_LANGUAGE) -> None:
        self.dropped[reason][language] += 1

    def count(self, name: str, amount: int = 1) -> None:
        """A step-specific counter (e.g. ``PI:EMAIL`` redactions)."""
        self.counters[name] += amount

    def merge(self, other: StepStats) -> None:
        for mine, theirs in ((self.inputs, other.inputs), (self.outputs, other.outputs)):
            for language, counts in theirs.items():
                for key, value in counts.items():
                    mine[language][key] += value
        for reason, languages in other.dropped.items():
            for language, value in languages.items():
                self.dropped[reason][language] += value
        for name, value in other.counters.items():
            self.counters[name] += value

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "in": _plain(self.inputs), "out": _plain(self.outputs),
                "dropped": _plain(self.dropped), "counters": dict(self.counters)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StepStats:
        stats = cls(record["step"])
        for target, source in ((stats.inputs, record["in"]), (stats.outputs, record["out"])):
            for language, counts in source.items():
                target[language].update(counts)
        for reason, languages in record["dropped"].items():
            stats.dropped[reason].update(languages)
        stats.counters.update(record["counters"])
        return stats


def _add(counts: dict[str, int], document: Document) -> None:
    counts["documents"] += 1
    counts["bytes"] += len(document.text.encode("utf-8", errors="surrogatepass"))


def _plain(nested: dict) -> dict:
    return {key: _plain(value) if isinstance(value, dict) else value for key, value in sorted(nested.items())}


class PipelineStep:
    """A step: ``run(documents)`` yields the documents that go on. Subclasses set ``name``."""

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def run(self, documents: Iterable[Document]) -> Iterator[Document]:
        for document in documents:
            self.stats.record_in(document)
            result = self.process(document)
            if result is not None:
                self.stats.record_out(result)
                yield result

    def process(self, document: Document) -> Document | None:
        """Transform one document, or return None after recording a drop."""
        raise NotImplementedError


class DocumentFilter(PipelineStep):
    """A step that keeps a document unchanged or drops it for a named reason."""

    def process(self, document: Document) -> Document | None:
        reason = self.reject_reason(document)
        if reason is None:
            return document
        self.stats.record_drop(reason, document.language)
        return None

    def reject_reason(self, document: Document) -> str | None:
        raise NotImplementedError
