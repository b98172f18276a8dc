"""The metrics of one optimizer step, as metrics.jsonl, W&B and TensorBoard receive them (rank 0).

    loss, lr, grad_norm, param_norm      the step's mean loss; gradient and parameter norms (each parameter once)
    global_batch_size                    the step's samples (smaller during a ramp-up)
    tokens_per_s, samples_per_s          the global batch over the step's wall time
    tflops, mfu, hfu                     per-device TFLOP/s of model FLOPs; MFU and HFU against the peak
                                         (``flops.py``; HFU counts recomputation under activation checkpointing)
    loss_scale, skipped_steps            fp16's dynamic loss scale and the steps it skipped (null otherwise)
    nonfinite_steps                      steps skipped for a NaN/Inf loss or gradient, over the whole run
    data_wait_s, compute_s, optimizer_s  time waiting for the batch, in forward/backward/step, and the
                                         optimizer step alone (null under pipeline parallelism, which fuses them)
    peak_memory_gb                       max allocated on a GPU, peak resident memory on CPU (rank 0)
    consumed_samples, consumed_tokens    overall, and ``tokens/<lang>`` per language of the blend
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np
import torch

from bloomtrain.config import ModelConfig, TrainConfig
from bloomtrain.data.blend import Blend
from bloomtrain.flops import Peak, hardware_flops_per_step, model_flops_per_step


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class StepMeter:
    def __init__(self, model: ModelConfig, train: TrainConfig, recompute: bool, peak: Peak, world_size: int,
                 blend: Blend | None, dataset, constants: dict[str, float] | None = None) -> None:
        """``blend`` None (fine-tuning): no tokens per language; ``constants`` go into every step's row."""
        self.train = train
        self.model_flops = model_flops_per_step(model, train.global_batch_size, train.seq_length)
        self.hardware_flops = hardware_flops_per_step(model, train.global_batch_size, train.seq_length, recompute)
        self.world_size = world_size
        self.peak = peak
        # Which language each sample of the training order comes from (megatron-core's blended index).
        self.languages = [entry.lang or entry.prefix for entry in blend.datasets] if blend is not None else []
        self.sample_language = getattr(dataset, "dataset_index", None)
        self.constants = constants or {}

    def tokens_by_language(self, first_sample: int, samples: int) -> dict[str, int]:
        if not self.languages:
            return {}
        if self.sample_language is None:
            return {self.languages[0]: samples * self.train.seq_length}
        counts = np.bincount(self.sample_language[first_sample:first_sample + samples],
                             minlength=len(self.languages))
        return {language: int(count) * self.train.seq_length for language, count in zip(self.languages, counts,
                                                                                           strict=True) if count}

    def metrics(self, *, loss: float, lr: float, grad_norm: float | None, param_norm: float | None,
                loss_scale: float | None, skipped_steps: int | None, nonfinite_steps: int, batch_size: int,
                elapsed: float, data_wait: float,
                optimizer_s: float | None, consumed_samples: int, consumed_tokens: int,
                tokens_by_language: dict[str, int], device: torch.device) -> dict[str, Any]:
        train = self.train
        share = batch_size / train.global_batch_size  # of a full step's FLOPs (a ramp-up step is smaller)
        per_device = share * self.model_flops / elapsed / self.world_size
        return {
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "param_norm": param_norm, "global_batch_size": batch_size,
            "tokens_per_s": batch_size * train.seq_length / elapsed,
            "samples_per_s": batch_size / elapsed,
            "tflops": per_device / 1e12,
            "mfu": per_device / self.peak.flops,
            "hfu": share * self.hardware_flops / elapsed / self.world_size / self.peak.flops,
            "loss_scale": loss_scale, "skipped_steps": skipped_steps, "nonfinite_steps": nonfinite_steps,
            "data_wait_s": data_wait, "compute_s": elapsed - data_wait, "optimizer_s": optimizer_s,
            "peak_memory_gb": peak_memory_gb(device),
            "consumed_samples": consumed_samples, "consumed_tokens": consumed_tokens,
            **{f"tokens/{language}": count for language, count in sorted(tokens_by_language.items())},
            **self.constants,
        }
