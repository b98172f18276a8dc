"""Validation: loss and perplexity per language on each language's held-out tokens, and overall.

Every evaluation reads the same samples: the first ``eval.iters`` global batches of a fixed,
seeded megatron-core dataset per language (``data/loader.py``), split over the data-parallel ranks
exactly as training batches are. The loss of a batch is the mean next-token cross entropy over its
tokens, averaged over data-parallel ranks (``TrainingEngine.evaluate_step``, forward only, under any
layout); a language's loss is the mean over its batches, the overall loss the token-weighted mean
over languages, and perplexity ``exp(loss)``.

A fine-tuning run is validated on each task's validation rows instead (:class:`TargetValidation`): the
mean loss over the target tokens of its split (at most ``eval.iters`` global batches, the last filled
with empty rows that carry no loss), overall the target-token-weighted mean over tasks; and, when
``eval.pretraining_blend`` names the starting model's data, on that data's validation sets as above.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from bloomtrain.config import ConfigError, EvalConfig, TrainConfig
from bloomtrain.data.blend import Blend, read_blend
from bloomtrain.data.finetune import scale_loss_weights
from bloomtrain.data.loader import BatchLayout, build_validation_datasets, load_tokenizer, step_batches
from bloomtrain.data.packing import PackedExamples

logger = logging.getLogger(__name__)

MicroBatches = list[dict[str, torch.Tensor]]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def summarize(losses: dict[str, float], tokens: dict[str, int]) -> dict[str, Any]:
    """``{"loss", "perplexity", "languages": {lang: {"loss", "perplexity", "tokens"}}}``, overall token-weighted."""
    total = sum(tokens.values())
    overall = sum(losses[language] * tokens[language] for language in losses) / total
    return {"loss": overall, "perplexity": perplexity(overall),
            "languages": {language: {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens[language]}
                          for language, loss in sorted(losses.items())}}


class Validation:
    def __init__(self, datasets: dict[str, Dataset], batch_layout: BatchLayout, iters: int, seq_length: int) -> None:
        self.datasets = datasets
        self.batch_layout = batch_layout
        self.iters = iters
        self.samples = iters * batch_layout.global_batch_size
        self.tokens = self.samples * seq_length  # every position of every sample is scored

    def run(self, loss_of: Callable[[MicroBatches], float],
            stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        """Collective: ``loss_of`` maps one step's micro-batches to their mean loss over all ranks. Between
        batches ``stop_requested`` (a collective too) may end it: then None, the partial result dropped."""
        losses = {}
        for language, dataset in self.datasets.items():
            total = 0.0
            for micro_batches in step_batches(dataset, self.batch_layout, 0, self.samples, num_workers=0):
                if stop_requested():
                    return None
                total += loss_of(micro_batches)
            losses[language] = total / self.iters
        return summarize(losses, {language: self.tokens for language in losses})


def build_validation(blend: Blend, tokenizer, train: TrainConfig, eval_config: EvalConfig, batch_layout: BatchLayout,
                     index_dir: Path, is_main: bool) -> Validation | None:
    """The run's validation over each language's held-out tokens, or None (``eval.interval=0``, or a blend
    without validation sets, which is said)."""
    if not eval_config.interval:
        return None
    if not blend.validation_sets:
        if is_main:
            logger.warning("eval.interval=%d but data.blend lists no validation sets (valid_prefix): no evaluation; "
                           "the data pipeline writes them (split.valid_fraction)", eval_config.interval)
        return None
    samples = eval_config.iters * train.global_batch_size
    datasets = build_validation_datasets(blend, tokenizer, train.seq_length, samples, train.seed, index_dir)
    full_batches = dataclasses.replace(batch_layout, rampup=None)  # evaluation ignores the ramp-up
    return Validation(datasets, full_batches, eval_config.iters, train.seq_length)


class TargetValidation:
    """The mean target-token loss of each task's rows (and overall, token-weighted), collective."""

    def __init__(self, sets: dict[str, PackedExamples], batch_layout: BatchLayout, iters: int) -> None:
        self.sets, self.batch_layout = sets, batch_layout
        self.samples = {name: min(iters, math.ceil(len(rows) / batch_layout.global_batch_size))
                        * batch_layout.global_batch_size for name, rows in sets.items()}

    def run(self, loss_of: Callable[[MicroBatches], float],
            stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        losses, tokens = {}, {}
        for name, rows in self.sets.items():
            samples = self.samples[name]
            targets = rows.denominator(0, min(samples, len(rows)))
            total = 0.0
            for micro_batches in step_batches(rows, self.batch_layout, 0, samples, num_workers=0):
                if stop_requested():
                    return None
                scale_loss_weights(micro_batches, targets, self.batch_layout.data_parallel_size)
                total += loss_of(micro_batches)
            losses[name], tokens[name] = total, targets
        return summarize(losses, tokens)


def build_target_validation(sets: dict[str, PackedExamples], eval_config: EvalConfig,
                            batch_layout: BatchLayout) -> TargetValidation | None:
    if not eval_config.interval or not sets:
        return None
    return TargetValidation(sets, batch_layout, eval_config.iters)


def build_pretraining_validation(path: str | None, train: TrainConfig, eval_config: EvalConfig,
                                 batch_layout: BatchLayout, index_dir: Path) -> Validation | None:
    """The validation of ``eval.pretraining_blend`` (a fine-tuning run's starting data), or None."""
    if not path or not eval_config.interval:
        return None
    try:
        blend = read_blend(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error).replace("data.blend", "eval.pretraining_blend")) from None
    return build_validation(blend, load_tokenizer(blend.tokenizer), train, eval_config, batch_layout, index_dir,
                            is_main=False)
