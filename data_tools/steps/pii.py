"""PII redaction as in ROOTS: e-mail addresses, IP addresses, user handles and secret keys become
tags (``PI:EMAIL``, ``PI:IP_ADDRESS``, ``PI:USER``, ``PI:KEY``), counted per type in the statistics.

The patterns favour precision: an IP address must have valid octets (or be a full IPv6 address), a
handle must follow whitespace or the start of a line (so ``name@example.com`` stays an e-mail), and a
key is a 32+ character run of letters and digits that mixes both (hashes, API tokens).
"""

from __future__ import annotations

import re

from data_tools.steps.base import Document, PipelineStep

OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("PI:EMAIL", re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")),
    ("PI:IP_ADDRESS", re.compile(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?![\w.]\d)|"
                                 r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")),
    ("PI:USER", re.compile(r"(?:(?<=^)|(?<=\s))@[A-Za-z_][A-Za-z0-9_]{2,30}\b", re.MULTILINE)),
    ("PI:KEY", re.compile(r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b")),
]


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for tag, pattern in PATTERNS:
        text, found = pattern.subn(tag, text)
        if found:
            counts[tag] = found
    return text, counts


class RedactPII(PipelineStep):
    name = "pii"

    def process(self, document: Document) -> Document | None:
        document.text, counts = redact(document.text)
        for tag, found in counts.items():
            self.stats.count(tag, found)
        return document
