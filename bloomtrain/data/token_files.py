"""Start-up checks of Megatron ``PREFIX.bin``/``PREFIX.idx`` token files, before any step reads them.

megatron-core's ``IndexedDataset`` trusts its files: a garbage ``.idx`` fails an ``assert`` deep inside
it, and a ``.bin`` cut short is only noticed when a data-loader worker reads past its end, steps
later. These checks read the index header and its arrays (a few bytes per document) and compare them
with the files' sizes, so a damaged file is refused in one line naming it.

The ``.idx`` layout (megatron-core's ``_IndexWriter``): 9-byte magic, version (u64 = 1), dtype code
(u8), sequence count S (u64), document count D (u64), then S int32 lengths, S int64 byte offsets
into ``.bin`` and D int64 document boundaries.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from bloomtrain.config import ConfigError
from bloomtrain.data.blend import Blend

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<QBQQ")
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


def token_count(prefix: str) -> int:
    """Tokens in ``prefix``'s files, after checking that the index and the data agree; ConfigError if not.

    The index is memory-mapped and checked at its ends and in total (cheap even for billions of
    documents), not entry by entry."""
    idx, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    fix = "rerun the data pipeline's tokenize stage for it, or remove it from data.blend"
    size = idx.stat().st_size
    with idx.open("rb") as handle:
        head = handle.read(len(MAGIC) + HEADER.size)
    if not head.startswith(MAGIC) or len(head) < len(MAGIC) + HEADER.size:
        raise ConfigError(f"{idx} is not a Megatron index file (bad header); {fix}")
    version, dtype_code, sequences, documents = HEADER.unpack_from(head, len(MAGIC))
    start = len(head)
    expected = start + sequences * (4 + 8) + documents * 8
    if version != 1 or dtype_code not in DTYPE_SIZES or size != expected:
        raise ConfigError(f"{idx} is damaged (version {version}, dtype code {dtype_code}, {size} bytes where "
                          f"its header implies {expected}); {fix}")
    item = DTYPE_SIZES[dtype_code]
    data = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = data[start:start + 4 * sequences].view(np.int32)
    offsets = data[start + 4 * sequences:start + 12 * sequences].view(np.int64)
    boundaries = data[start + 12 * sequences:].view(np.int64)
    tokens = int(lengths.sum(dtype=np.int64))
    ends_agree = sequences == 0 or (offsets[0] == 0 and offsets[-1] + int(lengths[-1]) * item == tokens * item)
    documents_agree = documents == 0 or (boundaries[0] == 0 and boundaries[-1] == sequences)
    if not (ends_agree and documents_agree) or (lengths < 0).any():
        raise ConfigError(f"{idx} is damaged (its offsets, lengths and documents disagree); {fix}")
    data_bytes = bin_path.stat().st_size
    if data_bytes != tokens * item:
        raise ConfigError(f"{bin_path} holds {data_bytes} bytes but its index describes {tokens} tokens "
                          f"({tokens * item} bytes): the file is truncated or from another run; {fix}")
    return tokens


MAX_EPOCHS = 10_000
"""More passes over one dataset than this is a mistake (a sequence longer than the data, or far too
many steps): megatron-core would spend hours building an index of that many epochs."""


def check_token_files(blend: Blend, seq_length: int, train_samples: int, valid_samples: int) -> None:
    """Every dataset of the blend is intact, and none must be repeated more than :data:`MAX_EPOCHS` times
    to give the run its samples (its share of ``train_samples``; ``valid_samples`` for a validation set)."""
    total_weight = sum(entry.weight for entry in blend.datasets)
    for entry in blend.datasets:
        wanted = {entry.prefix: train_samples * entry.weight / total_weight if len(blend.datasets) > 1
                  else train_samples}
        if entry.valid_prefix:
            wanted[entry.valid_prefix] = valid_samples
        for prefix, samples in wanted.items():
            tokens = token_count(prefix)
            epochs = math.ceil(samples * (seq_length + 1) / max(tokens, 1))
            if epochs > MAX_EPOCHS:
                raise ConfigError(
                    f"train.seq_length={seq_length} over {samples:,.0f} samples needs {prefix} ({tokens:,} tokens) "
                    f"repeated {epochs:,} times; lower train.seq_length or train.max_steps, or add data")
