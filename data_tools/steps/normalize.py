"""Text normalisation: Unicode NFC, ANSI escapes and control characters removed, whitespace tidied.

Newlines and tabs are content (paragraphs, code), so they are kept; runs of spaces collapse to one,
trailing spaces go, and more than two consecutive newlines become two. A document that is empty
afterwards is dropped as ``empty_after_normalization``.
"""

from __future__ import annotations

import re
import unicodedata

from data_tools.steps.base import Document, PipelineStep

ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# C0/C1 controls except \t \n, plus zero-width and bidi formatting characters that carry no text.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
SPACES = re.compile(r"[^\S\n\t]+")  # whitespace other than newlines and tabs, incl. NBSP and U+3000
TRAILING = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = ANSI_ESCAPE.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = CONTROL.sub("", text)
    text = SPACES.sub(" ", text)
    text = TRAILING.sub("\n", text)
    return BLANK_LINES.sub("\n\n", text).strip()


class Normalize(PipelineStep):
    name = "normalize"

    def process(self, document: Document) -> Document | None:
        text = normalize_text(document.text)
        if not text:
            self.stats.record_drop("empty_after_normalization", document.language)
            return None
        if text != document.text:
            self.stats.count("changed")
        document.text = text
        return document
