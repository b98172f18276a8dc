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

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from bloomtrain.data.blend import Blend

logger = logging.getLogger(__name__)


@dataclass
class BatchLayout:
    """How each optimizer step's samples are cut into micro-batches on this data-parallel rank.

    With ``rampup`` ([start, increment, samples], BLOOM's ramp-up) a step's global batch depends on
    the samples consumed before it, as megatron-core's ramp-up calculator computes it; otherwise it
    is ``global_batch_size`` throughout."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    rampup: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        assert self.global_batch_size % per_step == 0, "validated at start-up"
        self._ramp = None
        if self.rampup is not None:
            start, increment, samples = self.rampup
            assert start % per_step == 0 and increment % per_step == 0, "validated at start-up"
            if start < self.global_batch_size and samples > 0:
                from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

                self._ramp = RampupBatchsizeNumMicroBatchesCalculator(
                    self.global_batch_size, self.micro_batch_size, self.data_parallel_size,
                    decrease_batch_size_if_needed=False, rank=-1, start_global_batch_size=start,
                    batch_size_increment=increment, ramup_samples=samples)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of a full (post ramp-up) step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def batch_at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after ``consumed_samples``."""
        if self._ramp is None:
            return self.global_batch_size
        self._ramp.update(consumed_samples, consistency_check=False)
        return self._ramp.current_global_batch_size

    def micro_batches_at(self, consumed_samples: int) -> int:
        return self.batch_at(consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def samples_for(self, steps: int) -> int:
        """Samples the first ``steps`` steps consume."""
        if self._ramp is None:
            return steps * self.global_batch_size
        consumed = 0
        for _ in range(steps):
            consumed += self.batch_at(consumed)
        return consumed


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
    """Yields this rank's micro-batches of sample indices, step after step, from ``consumed_samples`` to
    ``end_samples`` (counted in consumed samples); the indices read are ``offset`` further on (the samples
    a loss-spike rollback passed over)."""

    def __init__(self, layout: BatchLayout, consumed_samples: int, end_samples: int, offset: int = 0) -> None:
        self.layout = layout
        self.consumed_samples = consumed_samples
        self.end_samples = end_samples
        self.offset = offset

    def _steps(self) -> Iterator[tuple[int, int]]:
        start = self.consumed_samples
        while start < self.end_samples:
            batch = self.layout.batch_at(start)
            yield start, batch
            start += batch

    def __iter__(self) -> Iterator[list[int]]:
        layout = self.layout
        for step_start, batch in self._steps():
            per_rank = batch // layout.data_parallel_size
            rank_start = self.offset + step_start + layout.data_parallel_rank * per_rank
            for micro in range(per_rank // layout.micro_batch_size):
                first = rank_start + micro * layout.micro_batch_size
                yield list(range(first, first + layout.micro_batch_size))

    def __len__(self) -> int:
        per_micro = self.layout.micro_batch_size * self.layout.data_parallel_size
        return sum(batch // per_micro for _, batch in self._steps())


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

    def __init__(self, loader: DataLoader, layout: BatchLayout, consumed_samples: int) -> None:
        self._batches = iter(loader)
        self._layout = layout
        self._position = consumed_samples  # where the next step starts, as the sampler counts
        if loader.num_workers:
            atexit.register(self.close)

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        micro_batches = []
        for _ in range(self._layout.micro_batches_at(self._position)):
            batch = next(self._batches)
            micro_batches.append({key: torch.from_numpy(array) for key, array in batch.items()})
        self._position += self._layout.batch_at(self._position)
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


TRAINING_KEYS = ("tokens", "labels", "segments", "loss_weights")  # the last two: fine-tuning rows only


def tokens_and_labels(samples: list[dict]) -> dict[str, np.ndarray]:
    """Collate only what training reads (megatron-core's samples also carry a loss mask and position
    ids; packed fine-tuning rows carry segment ids and loss weights too), as numpy arrays: a worker's
    arrays reach the trainer pickled through the loader's pipe, while
    tensors would each go through a shared-memory segment the trainer has to open and map, waiting on
    the worker to be scheduled beside its busy threads. A micro-batch of token ids is kilobytes."""
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]).numpy()
            for key in TRAINING_KEYS if key in samples[0]}


def step_batches(dataset: Dataset, layout: BatchLayout, consumed_samples: int, end_samples: int,
                 num_workers: int, offset: int = 0) -> StepBatches:
    """This rank's micro-batches, one list per optimizer step, from ``consumed_samples`` to ``end_samples``,
    reading ``offset`` samples further on."""
    # No pinned memory on GPUs either: the batches are token ids, kilobytes whose copy to the device
    # takes microseconds from pageable memory, and pinning each would cost more than it saves.
    loader = DataLoader(
        dataset,
        batch_sampler=MicroBatchSampler(layout, consumed_samples, end_samples, offset),
        num_workers=num_workers,
        collate_fn=tokens_and_labels,
        persistent_workers=False,
        worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
    )
    return StepBatches(loader, layout, consumed_samples)
