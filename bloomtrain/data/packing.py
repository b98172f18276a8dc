"""Fine-tuning samples: whole examples packed into rows of ``seq_length`` positions, epoch by epoch.

An example of ``n`` tokens (prompt, target, EOS; ``data_tools.finetune``) gives ``n - 1`` positions:
its tokens but the last as inputs, its tokens but the first as labels, the loss mask shifted with the
labels. Shifting per example, not per row, means no position predicts the next example's first token.
Rows carry a segment id per position (the example's place in the row, 1, 2, ...; 0 for padding), from
which the model builds a block-diagonal causal mask: no token attends to another example. Padding
attends only to padding (so it never produces NaN) and has no loss.

Packing (``pack_rows``): ``best_fit`` (best-fit decreasing: longest first, each into the row whose free
space it fills most tightly; the fewest rows) or ``greedy`` (in order, a new row when the next does not
fit; keeps the order). Each epoch is a fresh seeded shuffle of the examples (a dataset of weight ``w``
contributes each example ``floor(w)`` times plus a seeded ``w - floor(w)`` share once more), packed, and
its rows shuffled again; the epochs are laid end to end, so sample ``i`` of the run is fixed by the seed
and a resume at ``consumed_samples`` continues exactly, in the middle of an epoch too.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bloomtrain.data.blend import FINETUNE_KIND

PACKING_METHODS = ("best_fit", "greedy")


@dataclass
class FinetuneSplit:
    prefix: str
    loss_mask: str
    examples: int


@dataclass
class FinetuneSource:
    name: str
    weight: float
    splits: dict[str, FinetuneSplit]


@dataclass
class FinetuneBlend:
    tokenizer: str
    seq_length: int
    sources: list[FinetuneSource]


def read_finetune_blend(path: str | Path) -> FinetuneBlend:
    """A ``data_tools.finetune`` blend with its paths resolved; errors name ``data.blend``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.blend={path} does not exist; point it at the blend.json python -m "
                                "data_tools.finetune writes")
    payload = json.loads(path.read_text())
    if payload.get("kind") != FINETUNE_KIND:
        raise ValueError(f"data.blend={path} holds pretraining text, not fine-tuning data (data.kind=finetune); "
                         "prepare task data with python -m data_tools.finetune, or set data.kind=pretraining")
    root = path.parent
    sources = [FinetuneSource(entry["name"], float(entry["weight"]), {
        split: FinetuneSplit(str(root / entry[split]["prefix"]), str(root / entry[split]["loss_mask"]),
                             int(entry[split]["examples"]))
        for split in ("train", "valid", "test") if split in entry}) for entry in payload["datasets"]]
    return FinetuneBlend(str(root / payload["tokenizer"]), int(payload["seq_length"]), sources)


def pack_rows(lengths: np.ndarray, capacity: int, method: str = "best_fit") -> list[list[int]]:
    """Indices into ``lengths`` per row, each row's lengths summing to at most ``capacity``."""
    if method not in PACKING_METHODS:
        raise ValueError(f"packing method {method!r} is not one of {PACKING_METHODS}")
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an example of {int(lengths.max())} positions does not fit a row of {capacity}")
    rows: list[list[int]] = []
    if method == "greedy":
        free = 0
        for index, length in enumerate(lengths.tolist()):
            if length > free:
                rows.append([])
                free = capacity
            rows[-1].append(index)
            free -= length
        return rows
    # Best-fit decreasing: the rows' free space kept sorted; each example goes to the fullest row it fits.
    free_space: list[tuple[int, int]] = []  # (free, row)
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        place = bisect.bisect_left(free_space, (length, -1))
        if place == len(free_space):
            rows.append([index])
            bisect.insort(free_space, (capacity - length, len(rows) - 1))
        else:
            free, row = free_space.pop(place)
            rows[row].append(index)
            bisect.insort(free_space, (free - length, row))
    return rows


class PackedExamples(Dataset):
    """``epochs`` epochs of packed rows over examples (each a tokens / loss-mask pair of arrays); with
    ``epochs=None``, as many epochs as give ``min_rows`` rows.

    Each row also carries ``loss_weights``: its loss mask, divided by each example's target count under
    ``normalization="example"``. :meth:`denominator` is what a global batch's weighted loss sum is divided
    by (its target tokens, or its examples), so the loss is normalised over the whole global batch
    whatever its cut into micro-batches and ranks."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], weights: list[float], owners: list[int],
                 seq_length: int, epochs: int | None, seed: int, method: str = "best_fit", min_rows: int = 0,
                 normalization: str = "token") -> None:
        """``owners[i]``: which source example ``i`` comes from (its weight is ``weights[owner]``)."""
        if not examples:
            raise ValueError("no examples to pack")
        self.examples, self.seq_length, self.normalization = examples, seq_length, normalization
        positions = np.array([len(tokens) - 1 for tokens, _ in examples], dtype=np.int64)
        self.targets = np.array([int(np.count_nonzero(mask[1:])) for _, mask in examples], dtype=np.int64)
        self.rows: list[list[int]] = []
        self.epoch_starts: list[int] = []
        epoch = 0
        while (epoch < epochs) if epochs is not None else (len(self.rows) < min_rows):
            generator = np.random.default_rng([seed, epoch])
            chosen = []
            for index, owner in enumerate(owners):
                weight = weights[owner]
                chosen += [index] * (math.floor(weight) + int(generator.random() < weight - math.floor(weight)))
            order = generator.permutation(np.array(chosen, dtype=np.int64))
            packed = [[int(order[i]) for i in row] for row in pack_rows(positions[order], seq_length, method)]
            self.epoch_starts.append(len(self.rows))
            self.rows += [packed[i] for i in generator.permutation(len(packed))]
            epoch += 1
        per_row = [(int(self.targets[row].sum()), int(np.count_nonzero(self.targets[row]))) for row in self.rows]
        self._cumulative = np.concatenate([np.zeros((1, 2), dtype=np.int64),
                                           np.cumsum(np.array(per_row, dtype=np.int64).reshape(-1, 2), axis=0)])

    def denominator(self, first: int, count: int) -> int:
        """Rows ``first .. first + count - 1``'s target tokens (token normalisation) or examples (example)."""
        column = 0 if self.normalization == "token" else 1
        return int(self._cumulative[first + count, column] - self._cumulative[first, column])

    def __len__(self) -> int:
        return len(self.rows)

    def efficiency(self) -> float:
        """The share of positions holding an example (the rest is padding)."""
        used = sum(len(self.examples[i][0]) - 1 for row in self.rows for i in row)
        return used / max(1, len(self.rows) * self.seq_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = np.zeros(self.seq_length, dtype=np.int64)
        labels = np.zeros(self.seq_length, dtype=np.int64)
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        loss_weights = np.zeros(self.seq_length, dtype=np.float32)
        segments = np.zeros(self.seq_length, dtype=np.int64)
        start = 0
        for segment, example in enumerate(self.rows[index] if index < len(self.rows) else [], 1):
            example_tokens, example_mask = self.examples[example]
            end = start + len(example_tokens) - 1
            tokens[start:end] = example_tokens[:-1]
            labels[start:end] = example_tokens[1:]
            loss_mask[start:end] = example_mask[1:]
            loss_weights[start:end] = example_mask[1:] / (1 if self.normalization == "token"
                                                          else max(1, int(self.targets[example])))
            segments[start:end] = segment
            start = end
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "loss_weights": torch.from_numpy(loss_weights),
                "segments": torch.from_numpy(segments)}


def load_examples(blend: FinetuneBlend, split: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Every example of ``split`` across the blend's sources, and the source index of each."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    examples, owners = [], []
    for owner, source in enumerate(blend.sources):
        if split not in source.splits or not source.splits[split].examples:
            continue
        tokens = IndexedDataset(source.splits[split].prefix)
        masks = IndexedDataset(source.splits[split].loss_mask)
        for index in range(len(tokens)):
            # Copies: the arrays IndexedDataset returns view its memory map, unmapped once it is collected.
            examples.append((np.array(tokens[index], dtype=np.int64), np.array(masks[index], dtype=np.uint8)))
            owners.append(owner)
    return examples, owners
