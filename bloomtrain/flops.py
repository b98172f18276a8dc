"""FLOPs per step and the device's peak, for the TFLOP/s, MFU and HFU columns of metrics.jsonl.

MFU divides the model's FLOPs (no recomputation counted) by the peak; HFU divides what the hardware
really computes (with activation checkpointing, each block's forward once more) by the same peak.
The peak comes, in this order, from ``train.peak_tflops``, a table of dense (never sparse) half-
precision peaks of known GPUs (``gpus.py``), or a measurement: the best of 15 timed rounds of large square matmuls
(5 rounds at each of three sizes: 2048, 3072, 4096 on CPU; 4096, 6144, 8192 on GPU) in the run's
precision, each round long enough (0.2 s) that timer noise does not matter, with the threads the rank
really has. A busy machine (a VM's neighbours included) can only slow a round down, so the best round is
the closest to the true peak; many short rounds give it chances to miss a disturbance, and several sizes
keep one size's unlucky blocking or memory layout from setting the peak. The log says which source it used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bloomtrain.config import ModelConfig
from bloomtrain.gpus import gpu_for_device


def model_flops_per_step(config: ModelConfig, sequences: int, seq_length: int) -> float:
    """Training FLOPs of one step without recomputation: 72 B s l h^2 (1 + s/6h + V/12lh).

    From Narayanan et al. (2021), "Efficient Large-Scale Language Model Training on GPU Clusters";
    the same count BigScience reported for BLOOM, so MFU compares across frameworks.
    """
    h, layers, vocab = config.hidden_size, config.num_layers, config.padded_vocab_size()
    return 72.0 * sequences * seq_length * layers * h * h * (
        1.0 + seq_length / (6.0 * h) + vocab / (12.0 * layers * h)
    )


def hardware_flops_per_step(config: ModelConfig, sequences: int, seq_length: int, recompute: bool) -> float:
    """FLOPs the hardware computes: with full activation checkpointing every block's forward runs twice,
    96 B s l h^2 (1 + s/6h + V/16lh) (the same paper); otherwise the model FLOPs."""
    if not recompute:
        return model_flops_per_step(config, sequences, seq_length)
    h, layers, vocab = config.hidden_size, config.num_layers, config.padded_vocab_size()
    return 96.0 * sequences * seq_length * layers * h * h * (
        1.0 + seq_length / (6.0 * h) + vocab / (16.0 * layers * h)
    )


@dataclass(frozen=True)
class Peak:
    flops: float  # per device (per rank on CPU), FLOP/s
    source: str  # how it was obtained, for the log


def device_peak(device: torch.device, dtype: torch.dtype, configured_tflops: float | None = None) -> Peak:
    """The peak FLOP/s one rank's device can do in ``dtype``, and where the number comes from."""
    if configured_tflops:
        return Peak(configured_tflops * 1e12, f"train.peak_tflops={configured_tflops:g}")
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        gpu = gpu_for_device(torch.cuda.get_device_name(device))
        if gpu is not None:
            return Peak(gpu.half_precision_tflops * 1e12,
                        f"the dense {gpu.device_name} table entry ({gpu.half_precision_tflops:g} TFLOP/s)")
    # On this 2-core CPU one size could read 10-15% below another in one process and not in the next
    # (BLAS blocking, memory layout); the best over three sizes is stable.
    sizes = (4096, 6144, 8192) if device.type == "cuda" else (2048, 3072, 4096)
    measured = max(measure_matmul_flops(device, dtype, size) for size in sizes)
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    return Peak(measured, f"measured: {'/'.join(map(str, sizes))}-square {str(dtype).removeprefix('torch.')} "
                          f"matmuls{threads}, best of 15 rounds of 0.2 s ({measured / 1e12:.3f} TFLOP/s)")


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 3072, seconds: float = 0.2,
                         rounds: int = 5) -> float:
    """The best of ``rounds`` timings, each of as many ``size``-square matmuls as fit in ``seconds``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: kernels chosen, caches and clocks up
    best = 0.0
    for _ in range(rounds):
        _synchronize(device)
        start, done = time.perf_counter(), 0
        while True:
            torch.matmul(a, b)
            done += 1
            if done % 4 == 0 or device.type != "cuda":
                _synchronize(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
        best = max(best, 2.0 * size**3 * done / elapsed)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
