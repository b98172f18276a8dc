"""The data pipeline's steps, one planted case at a time."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from data_tools.steps.base import Document, StepStats
from data_tools.steps.dedup_exact import dedup_key, exact_duplicates
from data_tools.steps.langid import LanguageId
from data_tools.steps.normalize import Normalize, normalize_text
from data_tools.steps.pii import RedactPII, redact
from data_tools.steps.quality import QualityFilter, character_repetition_ratio, word_repetition_ratio, words_of
from data_tools.steps.read import DocumentReader, InputError, expand_inputs, plan_shards
from data_tools.steps.word_lists import WordList

ENGLISH = ("The committee met on Tuesday to discuss the new library, which will open next spring near the old "
           "market square. Residents asked whether the building would have longer opening hours and more seats "
           "for students who need a quiet place to work in the evenings.")


def _write_jsonl(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", ["jsonl.gz", "jsonl.zst", "parquet", "txt"])
def test_reader_formats(tmp_path, suffix):
    path = tmp_path / f"data.{suffix}"
    records = [{"id": "1", "text": "first document", "lang": "en"}, {"id": "2", "text": "second", "lang": "fr"}]
    if suffix == "jsonl.gz":
        _write_jsonl(path, [json.dumps(r) for r in records], opener=gzip.open)
    elif suffix == "jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(json.dumps(r) for r in records).encode()))
    elif suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("a plain text file\nwith two lines\n", encoding="utf-8")
    documents = list(DocumentReader(lang_field="lang").read(path))
    if suffix == "txt":
        assert [(d.id, d.text) for d in documents] == [("data.txt:1", "a plain text file\nwith two lines\n")]
    else:
        assert [(d.id, d.text, d.lang) for d in documents] == [("1", "first document", "en"),
                                                               ("2", "second", "fr")]


def test_byte_range_shards_read_every_line_once_in_order(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 13)}) for i in range(300)]
    lines[17], lines[200] = "{broken", ""  # a bad line and a blank one, counted (or skipped) once
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole_reader = DocumentReader()
    whole = [d.text for d in whole_reader.read(path)]
    size = path.stat().st_size
    for shard_bytes in (1, 97, 1000, size - 1, size):
        shards = plan_shards([path], shard_bytes)
        assert shards[0].start == 0 and all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))
        assert len(shards) == (1 if shard_bytes >= size else -(-size // shard_bytes))
        reader = DocumentReader()
        parts = [list(reader.read(shard)) for shard in shards]
        assert [d.text for part in parts for d in part] == whole, shard_bytes
        assert reader.stats.dropped == whole_reader.stats.dropped
        offsets = [int(d.id.split("@")[1]) for part in parts for d in part] if len(shards) > 1 else []
        assert all(path.read_bytes()[o - 1:o] == b"\n" for o in offsets if o)  # ids name where a line starts


def test_parquet_is_sharded_by_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    texts = [f"row {i} " + "text " * (i % 7) for i in range(250)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=20)
    shards = plan_shards([path], 300)
    assert len(shards) > 3 and shards[-1].stop == pq.ParquetFile(path).metadata.num_row_groups
    reader = DocumentReader()
    documents = [d for shard in shards for d in reader.read(shard)]
    assert [d.text for d in documents] == texts
    assert [d.id for d in documents] == [f"big.parquet:{i}" for i in range(1, 251)]  # rows keep their numbers
    assert plan_shards([path], 10**9)[0].is_part is False


def test_missing_or_unknown_inputs_stop_before_any_work(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="is not JSON Lines"):
        expand_inputs([str(tmp_path / "data.csv")])


def test_normalization():
    raw = "Cafe\u0301\x1b[31m red\x1b[0m\u200b  text\r\n\r\n\r\n\r\nnext\x07 line \u00a0end  "
    assert normalize_text(raw) == "Café red text\n\nnext line end"
    step = Normalize()
    assert list(step.run([Document("1", "\x1b[0m\u200b \n")])) == []
    assert step.stats.dropped["empty_after_normalization"]["unknown"] == 1


def test_language_id_labels_scripts_and_applies_thresholds():
    step = LanguageId(thresholds={"en": 0.5})
    texts = {"en": ENGLISH,
             "fr": "Le comité s'est réuni mardi pour discuter de la nouvelle bibliothèque du quartier.",
             "zh": "委员会星期二开会讨论新图书馆的开放时间和座位安排。",
             "ar": "اجتمعت اللجنة يوم الثلاثاء لمناقشة المكتبة الجديدة في الحي."}
    documents = list(step.run(Document(lang, text) for lang, text in texts.items()))
    assert [(d.id, d.lang) for d in documents] == [(lang, lang) for lang in texts]
    assert all(d.lang_score > 0.5 for d in documents)
    strict = LanguageId(thresholds={"en": 0.999999})
    assert list(strict.run([Document("x", "hello there")])) == []
    assert strict.stats.dropped["low_language_score"]["en"] == 1
    trusted = list(LanguageId(trust_source=True).run([Document("y", ENGLISH, lang="fr")]))
    assert trusted[0].lang == "fr" and trusted[0].lang_score == 0.0


def test_repetition_measures():
    assert character_repetition_ratio("abcdefghijklmnopqrstuvwxyz", 3) == 0.0
    assert character_repetition_ratio("ab" * 50, 10) == pytest.approx(46 / 91)  # top sqrt(2) = 1 of 2 grams
    words = "the cat sat on the mat".split()
    assert word_repetition_ratio(words, 5) == 0.0
    assert word_repetition_ratio(("a b c d e " * 10).split(), 5) > 0.9
    assert words_of("你好，世界！", "zh") == ["你", "好", "世", "界"]
    assert words_of("Hello, world!! 123", "en") == ["Hello", "world"]


def test_character_repetition_counts_as_substrings_do():
    """The hashed n-gram counts give ROOTS' ratio exactly, checked against a Counter of substrings."""
    import math
    from collections import Counter

    from data_tools.sample import SAMPLE_CORPUS

    def by_substrings(text: str, n: int) -> float:
        grams = Counter(text[i:i + n] for i in range(len(text) - n + 1))
        top = max(int(math.sqrt(len(grams))), 1)
        return sum(sorted((c for c in grams.values() if c > 1), reverse=True)[:top]) / sum(grams.values())

    texts = [json.loads(line)["text"] for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[::7]]
    texts += ["la la la " * 30 + "fin", "😀🙂" * 40 + "x"]  # characters beyond the BMP too
    for text in texts:
        for n in (3, 10):
            assert character_repetition_ratio(text, n) == pytest.approx(by_substrings(text, n), abs=1e-12)


def test_quality_filter_drops_each_planted_case(tmp_path):
    lists = tmp_path / "lists"
    (lists / "stopwords").mkdir(parents=True)
    (lists / "flagged").mkdir()
    (lists / "stopwords" / "en.txt").write_text("the\nto\na\nof\nand\nin\nfor\nwho\nwill\nwhich\non\nnear\nmore\n")
    (lists / "flagged" / "en.txt").write_text("badword\n")
    step = QualityFilter(word_lists_dir=str(lists))
    planted = {
        "good": ENGLISH,
        "too_few_words": "Too short to keep.",
        "character_repetition": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " * 5 + ENGLISH,
        "special_characters": str(3**700) + " " + ENGLISH,  # digits count as special, and do not repeat
        "too_few_stopwords": " ".join(f"word{i}x" for i in range(40)).replace("x", "q"),
        "flagged_words": ENGLISH.replace("library", "badword").replace("market", "badword").replace("quiet", "badword"),
    }
    documents = [Document(name, text, lang="en", lang_score=0.99) for name, text in planted.items()]
    documents.append(Document("low_language_score", ENGLISH, lang="en", lang_score=0.5))
    kept = list(step.run(documents))
    assert [d.id for d in kept] == ["good"]
    for name in planted.keys() - {"good"} | {"low_language_score"}:
        assert step.stats.dropped[name]["en"] == 1, name
    # Repeated words repeat characters too; with the character check relaxed, the word check catches them.
    relaxed = QualityFilter(overrides={"en": {"char_repetition_max": 1.0}}, check_language_score=False)
    spam = Document("spam", "buy cheap watches now today " * 12 + ENGLISH, lang="en")
    assert list(relaxed.run([spam])) == [] and relaxed.stats.dropped["word_repetition"]["en"] == 1


def test_quality_thresholds_are_roots_per_language_and_overridable():
    step = QualityFilter(overrides={"fr": {"min_words": 2}})
    assert step.parameters_for("en").min_words == 20 and step.parameters_for("zh").char_repetition_length == 3
    assert step.parameters_for("fr").min_words == 2 and step.parameters_for("fr").word_repetition_max == 0.13
    assert step.parameters_for("sw") == step.parameters_for("default")


def test_word_lists_match_phrases_longest_first_and_characters_without_spaces():
    words = WordList(["of", "bởi vì", "in spite of", "spite"], by_character=False)
    assert words.share("bởi vì anh".split()) == pytest.approx(2 / 3)
    assert words.share("in spite of it".split()) == pytest.approx(3 / 4)  # one phrase, not "spite" + "of"
    assert words.share("spite in".split()) == pytest.approx(1 / 2)
    assert words.share([]) == 0.0
    characters = WordList(["我们", "的"], by_character=True)
    assert characters.share(list("我们的书我")) == pytest.approx(3 / 5)  # a lone 我 is not 我们
    # Entries are compared in NFC and lower case, as the documents' words are.
    assert WordList(["E\u0301TAT"], by_character=False).share(["\u00e9tat"]) == 1.0


def test_packaged_word_lists_pass_real_prose_and_catch_planted_text():
    from data_tools.sample import SAMPLE_CORPUS
    from data_tools.steps.quality import ROOTS_PARAMETERS
    from data_tools.steps.word_lists import load_word_lists
    from data_tools.text import NO_SPACE_LANGUAGES

    stopwords = load_word_lists("stopwords", None, True, NO_SPACE_LANGUAGES)
    flagged = load_word_lists("flagged", None, True, NO_SPACE_LANGUAGES)
    assert {"ar", "ca", "en", "es", "eu", "fr", "hi", "id", "pt", "ur", "vi", "zh", "bn", "sw", "yo"} <= set(stopwords)
    assert {"ar", "en", "es", "fr", "hi", "id", "pt", "ur", "zh"} <= set(flagged)
    checked = passed = 0
    for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines():
        document = json.loads(line)
        language = document["lang"]
        if language in stopwords:
            words = [w.lower() for w in words_of(normalize_text(document["text"]), language)]
            checked += 1
            passed += stopwords[language].share(words) >= ROOTS_PARAMETERS.get(
                language, ROOTS_PARAMETERS["default"]).stopwords_min
    assert checked > 400 and passed / checked >= 0.99  # UDHR articles are prose
    nouns = "government market river mountain computer window garden station teacher bicycle " * 3
    assert stopwords["en"].share(nouns.split()) < ROOTS_PARAMETERS["en"].stopwords_min
    step = QualityFilter(check_language_score=False)
    spam = Document("spam", ENGLISH + " fuck shit fucking bitch cunt", lang="en")
    assert list(step.run([spam, Document("good", ENGLISH, lang="en")])) == [Document("good", ENGLISH, lang="en")]
    assert step.stats.dropped["flagged_words"]["en"] == 1 and step.stats.counters["stopwords_unchecked"] == 0
    # Single characters are not flagged in scripts without spaces: 性 is "nature" in 人性, 性质, ...
    assert flagged["zh"].share(list("人性的性质")) == 0.0


def _unigram_arpa(path, counts: dict[str, int]) -> dict[str, float]:
    """A KenLM-readable model that is unigram in effect (KenLM needs a bigram section: it holds one pair,
    "committee met", with zero backoff elsewhere); returns each token's log10 probability."""
    import math

    total = sum(counts.values()) + 1  # once for </s>
    log10 = {word: math.log10(count / total) for word, count in counts.items()}
    log10["</s>"] = math.log10(1 / total)
    log10["<unk>"] = -6.0  # what the corpus never shows is nearly impossible
    lines = ["\\data\\", f"ngram 1={len(log10) + 1}", "ngram 2=1", "", "\\1-grams:", "-99\t<s>\t0"]
    lines += [f"{value:.6f}\t{word}\t0" for word, value in log10.items()]
    lines += ["", "\\2-grams:", "-0.1\tcommittee met", "", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return log10


def test_perplexity_filter_scores_lines_as_ccnet_and_drops_above_the_limit(tmp_path):
    pytest.importorskip("kenlm")
    import kenlm

    from data_tools.steps.perplexity import PerplexityFilter, document_perplexity, normalise_for_lm

    assert normalise_for_lm("Élan, 1984!  Déjà-vu") == "elan 0000 deja vu"
    words = normalise_for_lm(ENGLISH).split()
    log10 = _unigram_arpa(tmp_path / "en.arpa", {w: words.count(w) for w in set(words)})
    model = kenlm.Model(str(tmp_path / "en.arpa"))
    text = "The market square.\nResidents asked, twice."
    expected = [log10[w] for w in ("the", "market", "square", "</s>", "residents", "asked", "<unk>", "</s>")]
    assert document_perplexity(model, text, "en") == pytest.approx(10 ** (-sum(expected) / len(expected)), rel=1e-4)

    limit = 2 * document_perplexity(model, ENGLISH, "en")
    step = PerplexityFilter({"en": {"model": str(tmp_path / "en.arpa"), "max_perplexity": limit}})
    documents = [Document("prose", ENGLISH, lang="en"), Document("noise", "qzx vlp krt wuv " * 10, lang="en"),
                 Document("french", "Le comité s'est réuni mardi.", lang="fr")]
    assert [d.id for d in step.run(documents)] == ["prose", "french"]
    assert step.stats.dropped["high_perplexity"]["en"] == 1 and step.stats.counters["perplexity_unchecked"] == 1


def test_quality_config_names_bad_perplexity_and_word_list_keys(tmp_path):
    from bloomtrain.config import ConfigError
    from data_tools.pipeline.config import load_pipeline_config

    base = ["input.paths=[x.jsonl]", f"output.dir={tmp_path}"]
    with pytest.raises(ConfigError, match="quality.perplexity.en.model: .*nowhere.arpa does not exist"):
        load_pipeline_config([*base, f"+quality.perplexity.en={{model:{tmp_path}/nowhere.arpa,max_perplexity:9}}"])
    with pytest.raises(ConfigError, match="quality.perplexity.en needs"):
        load_pipeline_config([*base, "+quality.perplexity.en={model:x}"])
    with pytest.raises(ConfigError, match="quality.word_lists_dir=.* holds no stopwords/ or flagged/"):
        load_pipeline_config([*base, f"quality.word_lists_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"quality.overrides.fr has unknown fields \['min_wordz'\]"):
        load_pipeline_config([*base, "+quality.overrides.fr={min_wordz:3}"])


def test_pii_redaction():
    text, counts = redact("Write to ana.lopez@example.org or @ana_l; host 10.0.0.254 and 2001:0db8:85a3:0000:0000:"
                          "8a2e:0370:7334; token ghp_16C7e42F292c6912E7710c838347Ae178B4a. Version 3.10.12, "
                          "score 999.1.1.1, see name@host")
    assert "ana.lopez" not in text and "@ana_l" not in text and "10.0.0.254" not in text
    assert "ghp_16C7e" not in text and "2001:0db8" not in text
    assert "Version 3.10.12" in text and "999.1.1.1" in text and "name@host" in text
    assert counts == {"PI:EMAIL": 1, "PI:IP_ADDRESS": 2, "PI:USER": 1, "PI:KEY": 1}
    step = RedactPII()
    list(step.run([Document("1", "mail a@b.io and c@d.io")]))
    assert step.stats.counters["PI:EMAIL"] == 2


def test_exact_dedup_ignores_spacing_digits_and_punctuation():
    documents = [Document("a", "Hello, World! Page 1"), Document("b", "hello world page 2"),
                 Document("c", "Hello   world... page"), Document("d", "Hello world, another page")]
    duplicate = exact_duplicates(np.array([dedup_key(d.text) for d in documents], dtype=np.uint64))
    assert [d.id for d, dropped in zip(documents, duplicate, strict=True) if not dropped] == ["a", "d"]
    assert int(duplicate.sum()) == 2


def test_stats_round_trip_and_merge():
    one, two = StepStats("s"), StepStats("s")
    one.record_in(Document("a", "xx", lang="en"))
    two.record_in(Document("b", "yyy", lang="en"))
    two.record_drop("reason", "en")
    two.count("thing", 3)
    one.merge(StepStats.from_json(json.loads(json.dumps(two.to_json()))))
    assert one.inputs["en"] == {"documents": 2, "bytes": 5}
    assert one.dropped["reason"]["en"] == 1 and one.counters["thing"] == 3
