"""Rebuild ``gettext_sample.jsonl.gz``, the second real corpus the tests run the pipeline on, from the
translation catalogs that Debian packages install (kept for provenance; the corpus ships in the repo).

    python -m data_tools.samples.build_gettext_sample data_tools/samples/gettext_sample.jsonl.gz

It reads ``/usr/share/locale/<locale>/LC_MESSAGES/<domain>.mo`` for the locales and domains below, as
installed on Debian 12 (bookworm): the messages of each catalog, in the catalog's order (sorted by
the English original), are joined line by line into documents of about ``DOCUMENT_CHARACTERS``
characters, at most ``DOCUMENTS_PER_CATALOG`` per catalog. Nothing is cleaned: the text keeps its
format strings, option tables, plural forms and untranslated fragments, which is the point. Debian
ships some catalogs twice under an old and a new name (``iso_3166`` and ``iso_3166-1``) and several
packages carry the same gnulib messages, so the corpus has natural exact and near duplicates; Chinese,
Japanese and Korean give it thousands of distinct characters.

Each line is ``{"id", "text", "locale", "source"}``; ``locale`` is the catalog's (the pipeline does not
read it: language identification decides). ``gettext_sample.provenance.json`` beside the corpus lists,
for every domain, the Debian package, its version and the licence its copyright file names.
"""

from __future__ import annotations

import gettext
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
LOCALES = ["de", "fr", "es", "it", "pt_BR", "nl", "sv", "pl", "cs", "ru", "uk", "tr", "vi", "ar",
           "zh_CN", "zh_TW", "ja", "ko"]
DOMAINS = ["coreutils", "bash", "tar", "grep", "sed", "dpkg", "apt", "libc", "glib20", "systemd", "postgres-15",
           "git", "gnupg2", "wget", "wget-gnulib", "man-db-gnulib", "shadow", "Linux-PAM", "xkeyboard-config",
           "iso_3166", "iso_3166-1", "iso_3166-2", "iso_3166_2", "iso_639-3", "iso_639_3"]
DOCUMENT_CHARACTERS = 1200
DOCUMENTS_PER_CATALOG = 7


def catalog_documents(path: Path) -> list[str]:
    """The catalog's translations (plural forms one per line), joined into documents."""
    with open(path, "rb") as handle:
        catalog = gettext.GNUTranslations(handle)._catalog
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for key, translation in catalog.items():
        original = key[0] if isinstance(key, tuple) else key
        if not original or not translation:  # the header, and messages left untranslated
            continue
        current.append(translation.replace("\x00", "\n"))
        size += len(translation)
        if size >= DOCUMENT_CHARACTERS:
            documents.append("\n".join(current))
            current, size = [], 0
            if len(documents) == DOCUMENTS_PER_CATALOG:
                return documents
    if current:
        documents.append("\n".join(current))
    return documents


def owning_package(path: Path) -> str:
    return subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, check=True
                          ).stdout.split(":")[0].strip()


def package_provenance(package: str) -> dict[str, str]:
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             check=True).stdout
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    licences = sorted(set(re.findall(r"^License:\s*(\S.*)$", copyright_file.read_text(errors="replace"),
                                     re.MULTILINE))) if copyright_file.exists() else []
    return {"package": package, "version": version, "licences": ", ".join(licences) or "see the package"}


def build(out_path: Path) -> int:
    provenance: dict[str, dict[str, str]] = {}
    count = 0
    with gzip.open(out_path, "wt", encoding="utf-8", compresslevel=9) as out:
        for locale in LOCALES:
            for domain in DOMAINS:
                path = LOCALE_DIR / locale / "LC_MESSAGES" / f"{domain}.mo"
                if not path.exists():
                    continue
                if domain not in provenance:
                    provenance[domain] = package_provenance(owning_package(path))
                source = f"debian:{provenance[domain]['package']} {provenance[domain]['version']} {path}"
                for index, text in enumerate(catalog_documents(path)):
                    record = {"id": f"{locale}-{domain}-{index}", "text": text, "locale": locale, "source": source}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
    out_path.with_name("gettext_sample.provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return count


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("gettext_sample.jsonl.gz"))
    print(f"wrote {build(target)} documents to {target}")
