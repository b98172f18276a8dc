"""Training batches from Megatron token datasets, through megatron-core's GPT/blended datasets.

The order of samples is fixed by megatron-core's shuffled index (seeded by ``train.seed``); a step
consumes the next ``global_batch_size`` samples of it, and each data-parallel rank takes its own
contiguous slice. Resuming at ``consumed_samples`` therefore continues exactly where a run stopped,
whatever the data-parallel size.
"""

from __future__ import annotations

import atexit
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from bloomtrain.data.blend import Blend

logger = logging.getLogger(__name__)


@dataclass
class BatchLayout:
    """How one optimizer step's samples are cut into micro-batches on this data-parallel rank."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int = 1
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        assert self.global_batch_size % per_step == 0, "validated at start-up"

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)


def load_tokenizer(path: str):
    """megatron-core's tokenizer for ``path`` (its metadata file sits beside the model)."""
    return MegatronTokenizer.from_pretrained(path)


def build_train_dataset(blend: Blend, tokenizer, seq_length: int, num_samples: int, seed: int,
                        index_cache_dir: Path) -> Dataset:
    """megatron-core's (blended) GPT dataset over the blend's prefixes, ``num_samples`` long."""
    weights = blend.weights if len(blend.prefixes) > 1 else None
    return _gpt_dataset(blend.prefixes, weights, 0, tokenizer, seq_length, num_samples, seed, index_cache_dir)


def build_validation_datasets(blend: Blend, tokenizer, seq_length: int, num_samples: int, seed: int,
                              index_cache_dir: Path) -> dict[str, Dataset]:
    """Per language, megatron-core's GPT dataset over its held-out tokens, ``num_samples`` long.

    The same seed gives the same samples every time, so each evaluation measures the same text.
    """
    return {language: _gpt_dataset([prefix], None, 1, tokenizer, seq_length, num_samples, seed, index_cache_dir)
            for language, prefix in sorted(blend.validation_sets.items())}


def _gpt_dataset(prefixes: list[str], weights: list[float] | None, split: int, tokenizer, seq_length: int,
                 num_samples: int, seed: int, index_cache_dir: Path) -> Dataset:
    """megatron-core's (blended) GPT dataset as its ``split`` (0 train, 1 validation)."""
    blend_per_split = [None, None, None]
    blend_per_split[split] = (prefixes, weights)
    sizes = [None, None, None]
    sizes[split] = num_samples
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens inside attention
        path_to_cache=str(index_cache_dir),
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[split]


class MicroBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of sample indices, step after step, from ``consumed_samples``."""

    def __init__(self, layout: BatchLayout, consumed_samples: int, total_samples: int) -> None:
        self.layout = layout
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples

    def __iter__(self) -> Iterator[list[int]]:
        layout = self.layout
        per_rank = layout.global_batch_size // layout.data_parallel_size
        for step_start in range(self.consumed_samples, self.total_samples, layout.global_batch_size):
            rank_start = step_start + layout.data_parallel_rank * per_rank
            for micro in range(layout.micro_batches_per_step):
                first = rank_start + micro * layout.micro_batch_size
                yield list(range(first, first + layout.micro_batch_size))

    def __len__(self) -> int:
        steps = (self.total_samples - self.consumed_samples) // self.layout.global_batch_size
        return steps * self.layout.micro_batches_per_step


def _leave_stop_signals_to_the_trainer(_: int) -> None:
    # torchrun and SLURM signal the whole process group; a loader worker dying of SIGTERM would abort
    # the step the trainer is finishing before its checkpoint. StepBatches.close() ends the workers.
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class StepBatches:
    """For each optimizer step, the list of this rank's micro-batches (``tokens``, ``labels``).

    :meth:`close` ends the loader's worker processes with SIGKILL (they ignore the stop signals, see
    above), and runs at exit too: Python's own exit would SIGTERM them and wait forever.
    """

    def __init__(self, loader: DataLoader, micro_batches_per_step: int) -> None:
        self._batches = iter(loader)
        self._per_step = micro_batches_per_step
        if loader.num_workers:
            atexit.register(self.close)

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        micro_batches = []
        for _ in range(self._per_step):
            batch = next(self._batches)
            micro_batches.append({"tokens": batch["tokens"], "labels": batch["labels"]})
        return micro_batches

    def close(self) -> None:
        # The loader's own shutdown first: it asks the workers to finish and stops watching them (a
        # worker it still watches dying of SIGKILL would raise here); then whatever did not finish.
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for worker in getattr(self._batches, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
        atexit.unregister(self.close)


def step_batches(dataset: Dataset, layout: BatchLayout, consumed_samples: int, total_samples: int,
                 num_workers: int) -> StepBatches:
    """This rank's micro-batches, one list per optimizer step, from ``consumed_samples`` on."""
    loader = DataLoader(
        dataset,
        batch_sampler=MicroBatchSampler(layout, consumed_samples, total_samples),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )
    return StepBatches(loader, layout.micro_batches_per_step)
