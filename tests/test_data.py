"""The bundled sample's path to tokens, the blend file, and the order batches are drawn in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bloomtrain.data.blend import Blend, BlendEntry, read_blend, temperature_weights, write_blend
from bloomtrain.data.loader import BatchLayout, MicroBatchSampler, step_batches
from data_tools.sample import SAMPLE_CORPUS, SAMPLE_VOCAB_SIZE, prepare_sample, read_documents
from data_tools.validation_split import split_key, validation_mask


def test_sample_corpus_is_multilingual_and_small():
    docs = list(read_documents(SAMPLE_CORPUS))
    langs = {doc["lang"] for doc in docs}
    assert len(langs) >= 6 and {"zh", "ar"} <= langs  # one CJK, one right-to-left script
    assert SAMPLE_CORPUS.stat().st_size < 5_000_000
    assert len({doc["id"] for doc in docs}) == len(docs)
    assert (SAMPLE_CORPUS.parent / "README.md").exists()  # provenance and licence


def test_prepared_tokens_decode_to_the_text(sample_cache):
    blend = read_blend(next(sample_cache.glob("sample-*/blend.json")))
    processor = spm.SentencePieceProcessor(model_file=blend.tokenizer)
    assert processor.get_piece_size() == SAMPLE_VOCAB_SIZE
    assert processor.eos_id() == 2 and processor.pad_id() == 3  # BLOOM's special-token ids
    texts_by_lang: dict[str, list[str]] = {}
    for doc in read_documents(SAMPLE_CORPUS):
        texts_by_lang.setdefault(doc["lang"], []).append(doc["text"])
    assert {entry.lang for entry in blend.datasets} == set(texts_by_lang)
    for entry in blend.datasets:
        decoded = {}
        for split, prefix, tokens in (("train", entry.prefix, entry.tokens),
                                      ("valid", entry.valid_prefix, entry.valid_tokens)):
            dataset = IndexedDataset(prefix)
            assert sum(len(dataset[i]) for i in range(len(dataset))) == tokens
            decoded[split] = []
            for i in range(len(dataset)):
                ids = dataset[i].tolist()
                assert ids[-1] == processor.eos_id()
                decoded[split].append(processor.decode(ids[:-1]))
        # Every article is in exactly one split, in the corpus' order; 3 of each language's 31 are held out.
        texts = texts_by_lang[entry.lang]
        assert len(decoded["valid"]) == 3 and not set(decoded["train"]) & set(decoded["valid"])
        for split in ("train", "valid"):
            assert decoded[split] == [text for text in texts if text in set(decoded[split])]
        assert sorted(decoded["train"] + decoded["valid"]) == sorted(texts)
    assert sum(blend.weights) == pytest.approx(1.0)


def test_validation_split_is_deterministic_bounded_and_per_language():
    keys = np.array([split_key(f"doc-{i}", f"text {i}") for i in range(300)], dtype=np.uint64)
    languages = ["en"] * 200 + ["yo"] * 95 + ["zu"] * 5
    valid = validation_mask(keys, languages, valid_fraction=0.05, min_documents=2, max_documents=8)
    chosen = {lang: [i for i, (lang_, v) in enumerate(zip(languages, valid, strict=True)) if v and lang_ == lang]
              for lang in ("en", "yo", "zu")}
    assert [len(chosen[lang]) for lang in ("en", "yo", "zu")] == [8, 5, 2]  # capped, 5% of 95, the minimum
    # The held-out documents are those with the smallest keys: the same whatever order they come in.
    assert chosen["yo"] == sorted(sorted(range(200, 295), key=lambda i: keys[i])[:5])
    reordered = validation_mask(keys[::-1].copy(), languages[::-1], 0.05, 2, 8)[::-1]
    assert np.array_equal(reordered, valid)
    # A language keeps at least one training document.
    assert validation_mask(keys[:2], ["xx", "xx"], 0.9, 5, 10).tolist().count(True) == 1
    assert not validation_mask(keys[:1], ["xx"], 0.5, 1, 10).any()


def test_prepare_sample_reuses_its_cache(sample_cache):
    blend_path = next(sample_cache.glob("sample-*/blend.json"))
    before = blend_path.stat().st_mtime_ns
    assert prepare_sample(sample_cache) == blend_path
    assert blend_path.stat().st_mtime_ns == before


def test_temperature_weights():
    counts = {"en": 900, "yo": 100}
    assert temperature_weights(counts, 1.0) == pytest.approx({"en": 0.9, "yo": 0.1})
    assert temperature_weights(counts, 0.0) == pytest.approx({"en": 0.5, "yo": 0.5})
    low = temperature_weights(counts, 0.3)
    assert 0.1 < low["yo"] < 0.5 and sum(low.values()) == pytest.approx(1.0)


def test_blend_file_round_trip_and_errors(tmp_path, sample_cache):
    source = read_blend(next(sample_cache.glob("sample-*/blend.json")))
    write_blend(tmp_path / "blend.json", Blend(tokenizer=source.tokenizer, datasets=[
        BlendEntry(prefix=source.datasets[0].prefix, weight=1.0, lang="x")]))
    assert read_blend(tmp_path / "blend.json").prefixes == [source.datasets[0].prefix]
    with pytest.raises(FileNotFoundError, match="data.blend="):
        read_blend(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"datasets": []}))
    with pytest.raises(ValueError, match="not a valid blend file"):
        read_blend(tmp_path / "bad.json")
    (tmp_path / "gone.json").write_text(json.dumps(
        {"tokenizer": source.tokenizer, "datasets": [{"prefix": "nowhere/en", "weight": 1.0}]}))
    with pytest.raises(FileNotFoundError, match="nowhere/en.bin"):
        read_blend(tmp_path / "gone.json")


def _indices(layout: BatchLayout, consumed: int, total: int) -> list[list[int]]:
    return list(MicroBatchSampler(layout, consumed, total))


def test_data_parallel_ranks_split_each_global_batch():
    ranks = [_indices(BatchLayout(2, 8, data_parallel_size=2, data_parallel_rank=r), 0, 16) for r in (0, 1)]
    assert ranks[0] == [[0, 1], [2, 3], [8, 9], [10, 11]]
    assert ranks[1] == [[4, 5], [6, 7], [12, 13], [14, 15]]
    single = [i for mb in _indices(BatchLayout(4, 8), 0, 16) for i in mb]
    assert sorted(i for r in ranks for mb in r for i in mb) == single


def test_resume_continues_the_sample_order():
    layout = BatchLayout(2, 4)
    full = _indices(layout, 0, 24)
    assert _indices(layout, 8, 24) == full[4:]
    assert len(MicroBatchSampler(layout, 8, 24)) == 8


def test_a_ramp_up_grows_the_batch_with_consumed_samples_as_megatron_does():
    # BLOOM's ramp-up, [start, increment, samples]: 192 -> 2048 by 16 over 9,765,625 samples.
    bloom = BatchLayout(2, 2048, data_parallel_size=8, rampup=(192, 16, 9_765_625))
    per_increment = 9_765_625 / ((2048 - 192) // 16)
    assert bloom.batch_at(0) == 192 and bloom.batch_at(int(per_increment) - 1) == 192
    assert bloom.batch_at(int(per_increment) + 1) == 208 and bloom.batch_at(9_765_626) == 2048
    assert bloom.micro_batches_at(0) == 192 // 16
    layout = BatchLayout(2, 8, data_parallel_size=2, data_parallel_rank=1, rampup=(4, 4, 8))
    assert [layout.batch_at(consumed) for consumed in (0, 4, 8, 12, 20)] == [4, 4, 8, 8, 8]
    assert layout.samples_for(4) == 4 + 4 + 8 + 8
    # Each rank reads its half of every step, whatever the step's size; a resume picks up the order.
    assert _indices(layout, 0, 24) == [[2, 3], [6, 7], [12, 13], [14, 15], [20, 21], [22, 23]]
    assert _indices(layout, 8, 24) == _indices(layout, 0, 24)[2:]
    assert len(MicroBatchSampler(layout, 0, 24)) == 6


class _NumberedSamples(torch.utils.data.Dataset):
    """Sample i's tokens are i, i+1, ...; with megatron-core's extra keys, which training does not read."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.arange(index, index + 5)
        return {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(5), "position_ids": torch.arange(5)}


def test_a_loader_worker_hands_over_the_same_batches_as_the_trainer_reading_them_itself():
    strategy = torch.multiprocessing.get_sharing_strategy()
    layout = BatchLayout(2, 4)
    in_process, from_worker = (list(step_batches(_NumberedSamples(), layout, 8, 24, workers)) for workers in (0, 1))
    assert len(in_process) == len(from_worker) == 4
    for ours, theirs in zip(in_process, from_worker, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys() == {"tokens", "labels"}
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
            assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (2, 5)
    assert in_process[0][0]["tokens"][:, 0].tolist() == [8, 9]  # the resume point, then the order
    # Handing over arrays leaves torch's process-wide sharing strategy alone.
    assert torch.multiprocessing.get_sharing_strategy() == strategy


def test_a_ramp_up_that_does_not_divide_into_micro_batches_is_one_line():
    from bloomtrain.config import ConfigError
    from bloomtrain.config_loader import load_config
    from bloomtrain.parallel.layout import resolve_layout

    config = load_config(["experiment=quickstart", "train.micro_batch_size=4", "train.rampup_batch_size=[8,4,40]"])
    with pytest.raises(ConfigError, match=r"the start \(8\) and the increment \(4\) must be too"):
        resolve_layout(config, 2)
    with pytest.raises(ConfigError, match="is not a multiple of the increment 5"):
        load_config(["experiment=quickstart", "train.rampup_batch_size=[8,5,40]"])
    assert resolve_layout(config, 1).data == 1
