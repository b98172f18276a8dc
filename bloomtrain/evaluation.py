"""Validation: loss and perplexity per language on each language's held-out tokens, and overall.

Every evaluation reads the same samples: the first ``eval.iters`` global batches of a fixed,
seeded megatron-core dataset per language (``data/loader.py``), split over the data-parallel ranks
exactly as training batches are. The loss of a batch is the mean next-token cross entropy over its
tokens, averaged over data-parallel ranks (``TrainingEngine.evaluate_step``, forward only, under any
layout); a language's loss is the mean over its batches, the overall loss the token-weighted mean
over languages, and perplexity ``exp(loss)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from bloomtrain.data.loader import BatchLayout, step_batches

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

    def run(self, loss_of: Callable[[MicroBatches], float]) -> dict[str, Any]:
        """Collective: ``loss_of`` maps one step's micro-batches to their mean loss over all ranks."""
        losses = {}
        for language, dataset in self.datasets.items():
            batches = step_batches(dataset, self.batch_layout, 0, self.samples, num_workers=0)
            losses[language] = sum(loss_of(micro_batches) for micro_batches in batches) / self.iters
        return summarize(losses, {language: self.tokens for language in losses})
