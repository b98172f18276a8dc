"""Model FLOPs per step and the device's peak, for the TFLOP/s and MFU columns of metrics.jsonl."""

from __future__ import annotations

import time

import torch

from bloomtrain.config import ModelConfig

# Dense bf16/fp16 tensor-core peaks (no sparsity), in FLOP/s, by a substring of the device name.
GPU_HALF_PRECISION_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12,
                            "L40": 181e12, "V100": 125e12, "MI250": 362e12, "MI300": 1307e12}


def model_flops_per_step(config: ModelConfig, sequences: int, seq_length: int) -> float:
    """Training FLOPs of one step without recomputation: 72 B s l h^2 (1 + s/6h + V/12lh).

    From Narayanan et al. (2021), "Efficient Large-Scale Language Model Training on GPU Clusters";
    the same count BigScience reported for BLOOM, so MFU compares across frameworks.
    """
    h, layers, vocab = config.hidden_size, config.num_layers, config.padded_vocab_size()
    return 72.0 * sequences * seq_length * layers * h * h * (
        1.0 + seq_length / (6.0 * h) + vocab / (12.0 * layers * h)
    )


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's peak FLOP/s: a table for known accelerators in half precision, else measured.

    Measuring (a large matmul in ``dtype``) gives a CPU or an unknown GPU an honest denominator.
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_HALF_PRECISION_PEAKS.items():
            if key in name:
                return peak
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5,
                         rounds: int = 4) -> float:
    """Best of ``rounds`` timings of ``repeats`` square matmuls: the best round is the one least
    disturbed by frequency ramp-up and other processes, so it is closest to the true peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(rounds):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        _synchronize(device)
        best = max(best, 2.0 * size**3 * repeats / (time.perf_counter() - start))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
