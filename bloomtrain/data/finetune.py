"""A fine-tuning run's data: packed training rows over every epoch, and each task's validation and test rows.

The blend is ``data_tools.finetune``'s (``kind: finetune``); rows come from :mod:`bloomtrain.data.packing`.
Training reads rows in order from ``consumed_samples`` as pretraining does (``data/loader.py``), so
resuming in the middle of an epoch continues exactly. The loss on a row is a weighted sum over its
positions (``loss_weights``: the target mask, per example under ``train.loss_normalization=example``);
:func:`scale_loss_weights` turns the weights of one step into the share of the whole global batch, so
that DeepSpeed's averaging over micro-batches and data-parallel ranks gives the global mean.

Each task's validation and test rows are one seeded epoch, packed greedily; ``bloomtrain/evaluation.py`` scores them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bloomtrain.config import ConfigError, TrainConfig
from bloomtrain.data.packing import FinetuneBlend, PackedExamples, load_examples

logger = logging.getLogger(__name__)

MicroBatches = list[dict[str, torch.Tensor]]


def scale_loss_weights(micro_batches: MicroBatches, denominator: int, data_parallel: int) -> None:
    """In place: each micro-batch's weights times (its step's micro-batches x data-parallel ranks) /
    ``denominator``. DeepSpeed divides each micro-batch's loss by the micro-batches and averages the ranks'
    gradients; what remains is the weighted loss sum over the global batch / ``denominator``."""
    scale = len(micro_batches) * data_parallel / max(1, denominator)
    for batch in micro_batches:
        batch["loss_weights"] = batch["loss_weights"] * scale


@dataclass
class FinetuneData:
    train: PackedExamples
    valid: dict[str, PackedExamples]
    test: dict[str, PackedExamples]


def build_finetune_data(blend: FinetuneBlend, train: TrainConfig, packing: str, rows_needed: int) -> FinetuneData:
    """Training rows for ``train.epochs`` epochs, or for at least ``rows_needed`` rows; each source's
    validation and test rows."""
    examples, owners = load_examples(blend, "train")
    if not examples:
        raise ConfigError("data.blend holds no training examples (its report.json says why records were skipped)")
    valid, test = _per_source(blend, "valid"), _per_source(blend, "test")
    longest = max(len(tokens) - 1 for split in (examples, *[e for e, _ in (*valid.values(), *test.values())])
                  for tokens, _ in split)
    if longest > train.seq_length:
        raise ConfigError(f"train.seq_length={train.seq_length} is shorter than the longest fine-tuning example "
                          f"({longest} positions); raise it to at least {longest}, or prepare the data with "
                          f"seq_length={train.seq_length}")
    weights = [source.weight for source in blend.sources]
    rows = PackedExamples(examples, weights, owners, train.seq_length, train.epochs, train.seed, packing,
                          min_rows=rows_needed, normalization=train.loss_normalization)

    def packed(sets: dict) -> dict[str, PackedExamples]:  # one seeded epoch: each example once
        return {name: PackedExamples(split_examples, [1.0], split_owners, train.seq_length, 1, train.seed + index,
                                     "greedy", normalization="token")
                for index, (name, (split_examples, split_owners)) in enumerate(sets.items())}

    return FinetuneData(rows, packed(valid), packed(test))


def _per_source(blend: FinetuneBlend, split: str) -> dict[str, tuple[list, list[int]]]:
    """Each source's examples of ``split`` (sources without any left out)."""
    examples, owners = load_examples(blend, split)
    sets: dict[str, tuple[list, list[int]]] = {}
    for example, owner in zip(examples, owners, strict=True):
        source_examples, source_owners = sets.setdefault(blend.sources[owner].name, ([], []))
        source_examples.append(example)
        source_owners.append(0)  # each set holds one source
    return sets


def rows_loss(loss_of: Callable[[MicroBatches], float], data_parallel: int) -> Callable[[MicroBatches], float]:
    """``loss_of`` for plain token batches (the pretraining validation of a fine-tuning run) given as packed
    rows of one segment each with every position weighted: the same mean loss, and the same kind of batch
    a pipeline's stages were built to pass (activation and segment ids)."""
    def of(micro_batches: MicroBatches) -> float:
        rows = [{**batch, "segments": torch.ones_like(batch["tokens"]),
                 "loss_weights": torch.ones(batch["tokens"].shape, dtype=torch.float32)} for batch in micro_batches]
        scale_loss_weights(rows, sum(batch["tokens"].numel() for batch in rows) * data_parallel, data_parallel)
        return loss_of(rows)
    return of


def prepare_finetune_data(blend: FinetuneBlend, config, is_main: bool) -> FinetuneData:
    """The run's fine-tuning data; with ``train.epochs``, sets ``train.max_steps`` from it (``config`` is the
    whole BloomTrainConfig)."""
    train = config.train
    if train.rampup_batch_size:
        raise ConfigError("train.rampup_batch_size is for pretraining; a fine-tuning run (data.blend of "
                          "fine-tuning data) trains with the full batch: set train.rampup_batch_size=null")
    spare = train.loss_spike_max_rollbacks * config.checkpoint.interval if train.loss_spike_factor else 0
    data = build_finetune_data(blend, train, config.data.packing, (train.max_steps + spare) * train.global_batch_size)
    if train.epochs is not None:
        steps = len(data.train) // train.global_batch_size  # whole global batches; a last partial one is left
        if steps < 1:
            raise ConfigError(f"train.epochs={train.epochs} gives {len(data.train)} packed rows, less than one "
                              f"global batch (train.global_batch_size={train.global_batch_size}); lower it")
        train.max_steps = steps
        decay = config.optimizer.decay_steps or steps
        if config.optimizer.warmup_steps >= decay:
            raise ConfigError(f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be smaller than the "
                              f"{decay} steps of train.epochs={train.epochs}; lower it")
    if is_main and config.eval.interval and not data.valid:
        logger.warning(
            "eval.interval=%d but data.blend holds no validation examples: no validation, and eval.metric=loss "
            "never improves; prepare the data with valid files or split.valid_fraction > 0", config.eval.interval)
    if is_main:
        per_epoch = data.train.epoch_starts[1] if len(data.train.epoch_starts) > 1 else len(data.train)
        logger.info(
            "fine-tuning data: %d training examples over %d tasks, %d packed rows per epoch (packing efficiency "
            "%.1f%%); %d steps", len(data.train.examples), len(blend.sources), per_epoch,
            100 * data.train.efficiency(), train.max_steps)
    return data
