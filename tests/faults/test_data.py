"""Corrupt or unusable token data is refused at start-up in one line naming the file or the key:
a truncated ``.bin``, a garbage ``.idx``, blend weights that are not positive, a sequence longer than a
dataset. Never garbage tokens, never a library traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bloomtrain.config import ConfigError
from bloomtrain.data.blend import read_blend
from bloomtrain.data.token_files import check_token_files, token_count
from tests.conftest import run_train
from tests.faults.helpers import assert_one_line_error, tiny_run


@pytest.fixture
def sample_copy(sample_cache, tmp_path) -> Path:
    """A private copy of the bundled sample's blend, tokenizer and token files, to damage."""
    source = next(sample_cache.glob("sample-*"))
    target = tmp_path / "sample"
    shutil.copytree(source, target)
    return target / "blend.json"


def _english(blend_path: Path) -> str:
    return next(entry.prefix for entry in read_blend(blend_path).datasets if entry.lang == "en")


def test_intact_files_are_counted_exactly(sample_copy):
    blend = read_blend(sample_copy)
    check_token_files(blend, 64, 4800, 160)
    for entry in blend.datasets:
        assert token_count(entry.prefix) == entry.tokens  # the pipeline's own count
        assert Path(entry.prefix + ".bin").stat().st_size == entry.tokens * 2  # uint16 tokens


def test_a_truncated_bin_is_refused_naming_it(sample_copy):
    prefix = _english(sample_copy)
    data = Path(prefix + ".bin")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"{data}.*truncated"):
        check_token_files(read_blend(sample_copy), 64, 4800, 160)


@pytest.mark.parametrize("damage", ["garbage", "short", "offsets"])
def test_a_damaged_idx_is_refused_naming_it(sample_copy, damage):
    index = Path(_english(sample_copy) + ".idx")
    raw = bytearray(index.read_bytes())
    if damage == "garbage":
        raw[:] = np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes()
    elif damage == "short":
        del raw[-8:]
    else:  # a plausible header over offsets that point elsewhere
        sequences = int.from_bytes(raw[18:26], "little")
        start = 34 + 4 * sequences
        raw[start:start + 8] = (12345).to_bytes(8, "little")
    index.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=str(index)):
        check_token_files(read_blend(sample_copy), 64, 4800, 160)


@pytest.mark.parametrize("weight", [-0.5, 0, math.nan, math.inf, "heavy"])
def test_blend_weights_must_be_positive_numbers(sample_copy, weight):
    payload = json.loads(sample_copy.read_text())
    payload["datasets"][1]["weight"] = weight
    sample_copy.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="weights must be positive finite numbers"):
        read_blend(sample_copy)


def test_a_sequence_that_would_repeat_a_dataset_endlessly_is_a_config_error(sample_copy):
    endless = r"train.seq_length=1000000 over [\d,]+ samples needs .* repeated [\d,]+ times"
    with pytest.raises(ConfigError, match=endless):
        check_token_files(read_blend(sample_copy), 1_000_000, 4800, 160)
    check_token_files(read_blend(sample_copy), 1024, 4800, 160)  # longer than some datasets: repeated, fine


@pytest.mark.slow
def test_training_on_damaged_data_stops_at_start_up_in_one_line(tmp_path, sample_cache, sample_copy):
    data = Path(_english(sample_copy) + ".bin")
    data.write_bytes(data.read_bytes()[:1000])
    result = run_train(tiny_run(tmp_path / "run", sample_cache, f"data.blend={sample_copy}", "train.max_steps=3",
                                "data.num_workers=1"), check=False, timeout=300)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "config error", str(data), "truncated")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step on garbage

    payload = json.loads(sample_copy.read_text())
    payload["datasets"][0]["weight"] = -1
    sample_copy.write_text(json.dumps(payload))
    result = run_train(tiny_run(tmp_path / "run2", sample_cache, f"data.blend={sample_copy}"), check=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "config error", "weights must be positive")
