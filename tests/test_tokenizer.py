"""Tokenizer files (bloomtrain/data/tokenizer.py): sentencepiece and Hugging Face tokenizers installed,
read by megatron-core, encoded in bulk, fingerprinted; their use by the pipeline's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bloomtrain.data.tokenizer import (
    TokenEncoder,
    find_tokenizer,
    install_tokenizer,
    megatron_path,
    tokenizer_fingerprint,
)
from data_tools.sample import SAMPLE_CORPUS
from data_tools.tokenizer_training import train_tokenizer
from tests.conftest import save_byte_level_bpe

TEXTS = [json.loads(line)["text"] for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:150]]
PROBES = ["Everyone has the right to life, liberty and security of person.", "人人生而自由，在尊严和权利上一律平等。",
          "  spaces\tand\nnew lines  ", "Tous les êtres humains naissent libres et égaux en dignité et en droits."]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return save_byte_level_bpe(TEXTS, 600, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("spm") / "tokenizer", 600)


def _megatron(path: Path):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(str(path))


def test_hugging_face_tokenizer_installs_and_megatron_core_reads_it_like_tokenizers(hf_folder, tmp_path):
    loadable = install_tokenizer(hf_folder, tmp_path / "tokenizer")
    assert loadable == tmp_path / "tokenizer"
    assert {p.name for p in loadable.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                    "tokenizer_metadata.json"}
    encoder, megatron = TokenEncoder(loadable), _megatron(loadable)
    assert encoder.library == "huggingface" and encoder.eos_token == "</s>" and encoder.eos_id == 2
    assert megatron.eod == encoder.eos_id and megatron.vocab_size == encoder.vocab_size == 600
    encoded = encoder.encode(PROBES)
    for text, ids in zip(PROBES, encoded, strict=True):
        assert megatron.tokenize(text) == ids
        assert encoder.decode(ids) == text  # byte-level BPE is lossless
    assert 2 not in [i for ids in encoded for i in ids]  # no special token added by encoding


def test_a_bare_tokenizer_json_gets_a_config_with_its_end_of_document_token(hf_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_folder / "tokenizer.json", bare / "bloom-tokenizer.json")
    loadable = install_tokenizer(bare / "bloom-tokenizer.json", tmp_path / "installed")
    config = json.loads((loadable / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"  # found by its conventional name
    assert _megatron(loadable).eod == 2


def test_a_tokenizer_without_an_end_of_document_token_is_refused_by_name(tmp_path):
    folder = save_byte_level_bpe(TEXTS[:20], 300, tmp_path / "odd", eos_token="<pad>")
    assert TokenEncoder(folder).eos_id == 3  # the configured one wins over the conventional name
    content = json.loads((folder / "tokenizer.json").read_text())
    for token in content["added_tokens"]:
        token["content"] = token["content"].replace("</s>", "<end>").replace("<pad>", "<blank>")
    content["model"]["vocab"] = {k.replace("</s>", "<end>").replace("<pad>", "<blank>"): v
                                 for k, v in content["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(content))
    for side in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / side).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="cannot tell the end-of-document token.*eos_token in tokenizer_config"):
        TokenEncoder(folder)


def test_sentencepiece_model_installs_and_encodes_as_sentencepiece(sentencepiece_model, tmp_path):
    import sentencepiece as spm

    loadable = install_tokenizer(sentencepiece_model, tmp_path / "tokenizer")
    assert loadable == tmp_path / "tokenizer" / "tokenizer.model"
    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    encoder = TokenEncoder(tmp_path / "tokenizer")
    assert encoder.library == "sentencepiece" and encoder.eos_id == processor.eos_id() == 2
    assert encoder.encode(PROBES) == processor.encode(PROBES)
    assert _megatron(loadable).tokenize(PROBES[0]) == processor.encode(PROBES[0])


def test_trained_tokenizer_keeps_special_tokens_whole(tmp_path):
    import sentencepiece as spm

    model = train_tokenizer(TEXTS, tmp_path / "tokenizer", 600, special_tokens=["<mask>", "<|code|>"])
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert [processor.id_to_piece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "<|code|>"]
    ids = processor.encode("right <mask> of <|code|>everyone")
    assert 4 in ids and 5 in ids and processor.decode(ids) == "right <mask> of <|code|>everyone"


def test_fingerprint_follows_the_tokenization_not_the_file_layout(hf_folder, sentencepiece_model, tmp_path):
    original = tokenizer_fingerprint(hf_folder)
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    content = json.loads((hf_folder / "tokenizer.json").read_text())
    content["truncation"] = {"max_length": 512, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    (resaved / "tokenizer.json").write_text(json.dumps(content, indent=4))  # other formatting and settings
    assert tokenizer_fingerprint(resaved) == original
    content["model"]["merges"] = content["model"]["merges"][:-1]  # one merge fewer: another tokenization
    (resaved / "tokenizer.json").write_text(json.dumps(content))
    assert tokenizer_fingerprint(resaved)["sha256"] != original["sha256"]
    assert tokenizer_fingerprint(sentencepiece_model)["library"] == "sentencepiece"
    assert tokenizer_fingerprint(install_tokenizer(sentencepiece_model, tmp_path / "copy")) == \
        tokenizer_fingerprint(sentencepiece_model)


def test_find_tokenizer_names_what_is_missing(tmp_path, hf_folder):
    with pytest.raises(ValueError, match="does not exist"):
        find_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither a tokenizer.json"):
        find_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a tokenizer"):
        find_tokenizer(tmp_path / "weights.bin")
    assert megatron_path(hf_folder / "tokenizer.json") == hf_folder


def test_pipeline_config_checks_an_existing_tokenizer_before_any_work(tmp_path, hf_folder):
    from bloomtrain.config import ConfigError
    from data_tools.pipeline.config import load_pipeline_config

    base = [f"input.paths=[{SAMPLE_CORPUS}]", f"output.dir={tmp_path / 'out'}"]
    assert load_pipeline_config([*base, f"tokenizer.existing={hf_folder}"]).tokenizer.existing == str(hf_folder)
    with pytest.raises(ConfigError, match="tokenizer.existing: .*missing.model does not exist"):
        load_pipeline_config([*base, f"tokenizer.existing={tmp_path / 'missing.model'}"])


GETTEXT_CORPUS = Path(__file__).resolve().parents[1] / "data_tools" / "samples" / "gettext_sample.jsonl.gz"


def _cjk_texts() -> list[str]:
    """Chinese, Japanese and Korean catalogs of the second bundled corpus: thousands of distinct characters."""
    import gzip

    with gzip.open(GETTEXT_CORPUS, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return [r["text"] for r in records if r["locale"] in ("zh_CN", "zh_TW", "ja", "ko")]


def test_character_coverage_is_chosen_so_any_script_mix_fits_the_vocabulary(tmp_path):
    from data_tools.tokenizer_training import (
        DEFAULT_COVERAGE,
        TokenizerTrainingError,
        _train,
        training_sentences,
    )

    texts = _cjk_texts()
    # The failure users met: sentencepiece's fixed coverage needs more characters than 1024 entries hold.
    with pytest.raises(RuntimeError, match="smaller than required_chars"):
        _train(list(training_sentences(texts)), 1024, "bpe", (), DEFAULT_COVERAGE)
    model = train_tokenizer(texts, tmp_path / "tokenizer", 1024)
    chosen = json.loads((tmp_path / "training.json").read_text())
    assert chosen["distinct_characters"] > 2500
    assert chosen["characters_as_pieces"] <= (1024 - 260) // 2 and 0 < chosen["byte_fallback_share"] < 0.5
    assert chosen["character_coverage"] == pytest.approx(1 - chosen["byte_fallback_share"])
    encoder = TokenEncoder(model)
    rare = "".join(sorted(set("".join(texts)))[-50:])  # characters left to bytes still decode exactly
    for text in [*texts[:20], rare]:
        ids = encoder.encode([text])[0]
        assert encoder.decode(ids) == text and 0 not in ids  # never <unk>
    # A coverage the user fixes is honoured, and when it cannot fit the error names the keys.
    with pytest.raises(TokenizerTrainingError, match=r"tokenizer.character_coverage=0.9995 .* tokenizer.vocab_size"):
        train_tokenizer(texts, tmp_path / "fixed", 1024, character_coverage=0.9995)


def test_long_documents_are_cut_into_sentences_not_skipped(tmp_path):
    from data_tools.tokenizer_training import MAX_SENTENCE_BYTES, _train, training_sentences

    line = "Everyone has the right to life, liberty and security of person."
    document = "\n".join(TEXTS) + "\n" + "长" * 3000  # the sample's articles as one document, a 9 kB line
    pieces = list(training_sentences([document]))
    assert "".join(pieces) == document and len(pieces) > 6
    assert all(len(piece.encode()) <= MAX_SENTENCE_BYTES for piece in pieces)
    assert sum(piece.endswith("\n") for piece in pieces) >= len(pieces) - 4  # at line ends where there are some
    # sentencepiece alone skips a sentence over 4192 bytes, and with nothing else fails to train at all.
    with pytest.raises(RuntimeError, match="sentences_.empty"):
        _train([document], 600, "bpe", (), 0.9995)
    model = train_tokenizer([document], tmp_path / "tokenizer", 600)
    assert json.loads((tmp_path / "training.json").read_text())["sentences"] == len(pieces)
    encoder = TokenEncoder(model)
    assert len(encoder.encode([line])[0]) < len(line) / 2  # it learned merges from the long document


def test_a_vocabulary_that_cannot_work_is_refused_at_config_time(tmp_path):
    from bloomtrain.config import ConfigError
    from data_tools.pipeline.config import load_pipeline_config

    base = [f"input.paths=[{tmp_path}]", f"output.dir={tmp_path}/out"]
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=400 .* at least 516$"):
        load_pipeline_config([*base, "tokenizer.vocab_size=400"])
    with pytest.raises(ConfigError, match=r"at least 518$"):
        load_pipeline_config([*base, "tokenizer.vocab_size=517", "tokenizer.special_tokens=[mask,code]"])
    with pytest.raises(ConfigError, match=r"tokenizer.character_coverage=0.5 must lie in \[0.98, 1\]"):
        load_pipeline_config([*base, "tokenizer.character_coverage=0.5"])
    assert load_pipeline_config([*base, "tokenizer.vocab_size=516"]).tokenizer.character_coverage is None
