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

The probe is bounded in time whatever the device and precision. For a half precision, a first ramp of
matmuls (512-square, doubling until one takes 50 ms) in it and in fp32 tells how the two compare. A
precision more than four times slower than fp32 on the same device is said once (such a run is better
off in fp32), and its sizes shrink so that one matmul takes at most a second (bf16 on a CPU without
bf16 instructions runs at about 1 GFLOP/s, where a 4096-square matmul takes over two minutes). fp32,
and a precision as fast as it, is measured at the full sizes even on a busy machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from bloomtrain.config import ModelConfig
from bloomtrain.gpus import gpu_for_device

logger = logging.getLogger(__name__)


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
    if dtype != torch.float32:
        # Compared with fp32 on the same device at the same moment, so a busy machine slows both alike: a
        # busy machine must never shrink the probe (smaller matmuls read a lower peak, a flattering MFU).
        rate, fp32_rate = ramp_matmul_flops(device, dtype), ramp_matmul_flops(device, torch.float32)
        if rate * SLOW_PRECISION_FACTOR < fp32_rate:
            logger.warning("%s matmuls run at %.1f GFLOP/s on this %s, %.0fx slower than fp32 (%.1f GFLOP/s; a CPU "
                           "without %s instructions): train.precision=fp32 will train faster here",
                           str(dtype).removeprefix("torch."), rate / 1e9, device.type, fp32_rate / rate,
                           fp32_rate / 1e9, str(dtype).removeprefix("torch."))
            if 2.0 * sizes[-1] ** 3 / rate > MAX_MATMUL_SECONDS:
                scale = (MAX_MATMUL_SECONDS * rate / 2.0) ** (1 / 3) / sizes[-1]
                sizes = tuple(max(64, int(size * scale) // 64 * 64) for size in sizes)
    measured = max(measure_matmul_flops(device, dtype, size) for size in sizes)
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    return Peak(measured, f"measured: {'/'.join(map(str, sizes))}-square {str(dtype).removeprefix('torch.')} "
                          f"matmuls{threads}, best of 15 rounds of 0.2 s ({measured / 1e12:.3f} TFLOP/s)")


MAX_MATMUL_SECONDS = 1.0
SLOW_PRECISION_FACTOR = 4.0


def ramp_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.05) -> float:
    """A first, quick speed: square matmuls from 512 up, doubling until one takes ``seconds`` (or 4096)."""
    size = 512
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or size >= 4096:
            return 2.0 * size**3 / elapsed
        size *= 2


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
