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
