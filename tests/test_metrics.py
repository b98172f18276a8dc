"""Honest throughput numbers: the FLOPs counts, the peak MFU divides by, and the per-step metrics."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from bloomtrain.config_loader import load_config
from bloomtrain.flops import device_peak, hardware_flops_per_step, model_flops_per_step


def test_flops_counts_follow_the_published_formula():
    config = load_config(["model=bloom-176b"]).model
    # BLOOM-176B: 6 x params x tokens is the usual approximation of 72 B s l h^2 (1 + s/6h + V/12lh).
    flops = model_flops_per_step(config, sequences=2048, seq_length=2048)
    assert flops == pytest.approx(6 * 176e9 * 2048 * 2048, rel=0.1)
    # Activation checkpointing recomputes every block's forward: 4/3 of the work of the matmuls.
    with_recompute = hardware_flops_per_step(config, 2048, 2048, recompute=True)
    assert 1.25 < with_recompute / flops < 4 / 3
    assert hardware_flops_per_step(config, 2048, 2048, recompute=False) == flops


def test_configured_and_tabled_peaks_win_over_measuring(monkeypatch):
    peak = device_peak(torch.device("cpu"), torch.float32, configured_tflops=1.5)
    assert peak.flops == 1.5e12 and "train.peak_tflops" in peak.source
    # A GPU in the table (gpus.py) is not measured: its dense half-precision peak is taken as it is.
    # No GPU here, so the device name is all that is faked; measuring would fail on a CUDA device.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    tabled = device_peak(torch.device("cuda", 0), torch.bfloat16)
    assert tabled.flops == 312e12 and "A100 table entry" in tabled.source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert device_peak(torch.device("cuda", 0), torch.float16).flops == 125e12  # A10, not A100's row


def _long_matmul_flops(size: int = 4096, runs: int = 3, seconds: float = 1.5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(runs):
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            done += 1
        best = max(best, 2 * size**3 * done / (time.perf_counter() - start))
    return best


@pytest.mark.slow  # 20-45 s of matmuls
def test_measured_peak_agrees_with_a_long_independent_measurement():
    """The start-up probe against a separate, longer measurement taken just before and just after it.
    This VM's speed can drop by a fifth for several seconds (seen once in CI: probe 119, reference 151
    GFLOP/s); an attempt whose two reference measurements disagree by more than 8% was not taken under
    steady conditions and is repeated, up to three times. Under steady conditions the probe must be
    within 15%."""
    attempts = []
    for _ in range(3):
        before = _long_matmul_flops()
        peak = device_peak(torch.device("cpu"), torch.float32)
        after = _long_matmul_flops()
        assert "measured" in peak.source and f"{torch.get_num_threads()} threads" in peak.source
        attempts.append((before, peak.flops, after))
        if abs(before - after) / max(before, after) < 0.08:
            break
    else:
        pytest.fail(f"the machine's matmul speed never held steady across an attempt: {attempts}")
    independent = max(before, after)
    assert abs(peak.flops - independent) / independent < 0.15, attempts


@pytest.mark.slow
def test_the_peak_probe_is_bounded_and_says_when_a_precision_is_slow(caplog):
    """fp16 matmuls on a CPU without fp16 instructions run at a few GFLOP/s: the full-size probe took many
    minutes there. Now its sizes shrink to fit, and the run is told that fp32 would be faster."""
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bloomtrain.flops"):
        peak = device_peak(torch.device("cpu"), torch.float16)
    assert time.perf_counter() - started < 60
    assert peak.flops > 0 and "float16 matmuls" in peak.source
    slow = [record.getMessage() for record in caplog.records if "fp32 will train faster" in record.getMessage()]
    if slow:  # on this kind of CPU: the factor it states is at least the threshold
        assert float(slow[0].split("x slower than fp32")[0].rsplit(" ", 1)[1]) >= 4


def test_a_line_still_being_written_is_not_read_and_a_resume_drops_a_torn_one(tmp_path):
    """``metrics.jsonl`` is read while a run appends to it, and a kill can land in a write."""
    from bloomtrain.config import LoggingConfig, WandbConfig
    from bloomtrain.metrics import METRICS_FILE, MetricsLogger, read_metrics

    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=WandbConfig(mode="disabled")), "run", {}, resume_step=2)
    logger.log({"loss": 1.8}, step=3)
    logger.close()
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path)] == [(1, 2.0), (2, 1.9), (3, 1.8)]
