"""Planning: the published recipes compose, validate and fit; the plan's numbers (parameters per GPU,
bytes per parameter, tokens, steps) follow from the model's shapes; the 176B dry run under SLURM prints
them; the suggester finds BigScience's layout among those that fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bloomtrain.config_loader import load_config
from bloomtrain.parallel.layout import process_count, resolve_layout
from bloomtrain.plan import (
    GIB,
    PlannedLayout,
    activation_bytes_per_layer,
    blocks_per_stage,
    layout_of,
    plan_of,
    stage_parameters,
    state_bytes_per_parameter,
    suggest,
)
from tests.conftest import REPO

# Published layouts: (processes, tensor, pipeline, data), from the BigScience scripts the recipes cite.
RECIPES = {"bloom-176b": (384, 4, 12, 8), "bloom-7b1": (128, 4, 4, 8), "bloom-1b7": (64, 1, 2, 32),
           "bloom-560m": (32, 1, 1, 32)}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_composes_validates_and_fits(recipe):
    config = load_config([f"experiment={recipe}"])
    processes = process_count(config)
    layout = resolve_layout(config, processes)
    assert (processes, layout.tensor, layout.pipeline, layout.data) == RECIPES[recipe]
    plan = plan_of(config, layout_of(config, layout.data))
    assert plan.fits, plan.table()  # each of them trained on that hardware
    assert plan.tokens_per_step == config.train.global_batch_size * 2048
    assert plan.samples >= plan.steps * (config.train.rampup_batch_size or [config.train.global_batch_size])[0]


def test_a_recipe_on_too_few_processes_says_how_many_it_needs():
    from bloomtrain.config import ConfigError

    with pytest.raises(ConfigError, match="start a multiple of 48 processes"):
        resolve_layout(load_config(["experiment=bloom-176b"]), 8)


def test_parameters_per_gpu_follow_from_the_shapes():
    model = load_config(["experiment=bloom-176b"]).model
    h, t = model.hidden_size, 4
    # One tensor rank's block: QKV and h->4h column-parallel (weights and biases split), the output and
    # 4h->h row-parallel (weights split, biases whole), four LayerNorm vectors whole.
    block = (3 * h * h + 3 * h) // t + (h * h) // t + h + (4 * h * h + 4 * h) // t + (4 * h * h) // t + h + 4 * h
    blocks = blocks_per_stage(model.num_layers, 12)
    assert blocks == [6] * 10 + [5] * 2 and sum(blocks) == 70  # DeepSpeed's balanced partition
    held = stage_parameters(model, t, 12)
    assert held[0] == 250880 * h // t + 2 * h + 6 * block  # embedding shard, its LayerNorm, six blocks
    assert held[-1] == 250880 * h // t + 2 * h + 5 * block  # the tied embedding again, the final LayerNorm
    assert held[5] == 6 * block
    assert sum(stage_parameters(model, 1, 1)) == pytest.approx(176.25e9, rel=1e-3)


def test_the_gpu_table_is_the_one_the_config_accepts():
    from bloomtrain.config import ConfigError
    from bloomtrain.gpus import GPUS, PLANNED_GPUS

    assert set(PLANNED_GPUS) == {name for name, gpu in GPUS.items() if gpu.plannable}
    assert "A10-24GB" not in PLANNED_GPUS  # known for MFU's peak only: no bandwidths to plan with
    with pytest.raises(ConfigError, match="launch.gpu='B200' is not one of"):
        load_config(["launch.gpu=B200"])


def test_bytes_per_parameter_by_precision_and_zero_stage():
    assert state_bytes_per_parameter("fp32", 0, 8) == (4, 4, 8)  # Adam's two moments
    assert state_bytes_per_parameter("fp32", 1, 8) == (4, 4 + 0.5, 1.5)  # + an fp32 copy, its gradient
    assert state_bytes_per_parameter("bf16", 0, 8) == (2, 2 + 4, 12)
    assert state_bytes_per_parameter("bf16", 1, 8) == (2, 2 + 0.5, 1.5)
    assert state_bytes_per_parameter("bf16", 2, 8) == (2, 0.25 + 0.5, 1.5)
    assert state_bytes_per_parameter("bf16", 3, 8) == (0.25, 0.25 + 0.5, 1.5)
    model = load_config(["model=bloom-176b"]).model
    full = activation_bytes_per_layer(model, 2048, 2, 4, "bf16", False, False)
    assert full == 2048 * 2 * 14336 * (8 + 34 / 4)
    assert activation_bytes_per_layer(model, 2048, 2, 4, "bf16", False, True) < full
    assert activation_bytes_per_layer(model, 2048, 2, 4, "bf16", True, False) == 2 * 2048 * 2 * 14336


def _saved_bytes(model, tokens) -> int:
    """Bytes of the activations autograd keeps for backward in one forward (each storage once, the
    parameters it also keeps not counted)."""
    parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen | parameters:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens)
    return total


# Measured here (bytes per s b h, estimate in brackets): fp32 64.1 (63) at every shape, sequences 64 to 2048;
# bf16 42.0 (42). Nothing grows with the sequence: the fused attention kernel keeps no probabilities and the
# ALiBi bias is shared by the blocks (the estimate counts it once per stage).
@pytest.mark.parametrize("seq_length,micro_batch,hidden,heads,precision", [
    (64, 8, 512, 4, "fp32"), (128, 4, 384, 6, "fp32"), (256, 4, 768, 12, "fp32"), (512, 2, 256, 8, "fp32"),
    (2048, 1, 256, 8, "fp32"),
    (64, 8, 512, 4, "bf16"),  # bf16 matmuls are slow on this CPU: one shape
])
def test_the_activation_estimate_is_what_a_block_really_saves(seq_length, micro_batch, hidden, heads, precision):
    from bloomtrain.config import ModelConfig
    from bloomtrain.model.bloom import Bloom

    torch.manual_seed(0)
    tokens = torch.randint(0, 1024, (micro_batch, seq_length))
    saved = {}
    for layers in (2, 4):
        config = ModelConfig(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, vocab_size=1024)
        saved[layers] = _saved_bytes(Bloom(config).to(torch.float32 if precision == "fp32" else torch.bfloat16),
                                     tokens)
    per_block = (saved[4] - saved[2]) / 2
    estimate = activation_bytes_per_layer(config, seq_length, micro_batch, 1, precision, False, False)
    assert estimate == pytest.approx(per_block, rel=0.05)


def _engine_report(tmp_path, sample_cache, processes, *overrides, env: dict | None = None) -> dict:
    from tests.conftest import run_torchrun

    out = tmp_path / "report"
    run_torchrun(processes, [str(out), "experiment=quickstart", f"run.dir={tmp_path / 'run'}",
                             f"data.cache_dir={sample_cache}", "train.max_steps=2", "optimizer.warmup_steps=1",
                             "train.seq_length=64", "eval.interval=0", "checkpoint.interval=0",
                             "logging.wandb.mode=disabled", "logging.tensorboard=false", "train.peak_tflops=1",
                             *overrides],
                 module="tests.memory_checks", env=env)
    return json.loads((out / "rank_0.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes,overrides", [
    (2, ["parallel.zero_stage=1", "parallel.data=2", "train.precision=bf16"]),
    (2, ["parallel.zero_stage=1", "parallel.tensor=2", "train.precision=bf16"]),
], ids=["bf16-zero1-dp2", "bf16-tp2"])
def test_the_states_are_the_bytes_deepspeed_allocates(tmp_path, sample_cache, processes, overrides):
    """In half precision here; fp32 under ZeRO 1 x data 2 and ZeRO 0 x pipeline 2 in the runs below."""
    assert_states_are_the_bytes_deepspeed_allocates(_engine_report(tmp_path, sample_cache, processes, *overrides))


def assert_states_are_the_bytes_deepspeed_allocates(report: dict) -> None:
    assert report["local_parameters"] == report["held_parameters"]  # exact, stage and shards included
    assert report["weights"] == report["estimated_weights"]
    # Adam's moments and the fp32 copy DeepSpeed keeps between steps (its gradient lives during the step).
    assert report["moments"] + report["masters"] == report["estimated_optimizer"]
    # ZeRO 1/2's gradient bucket is capped at the rank's parameters (DeepSpeed's default is 5e8 elements).
    assert report["gradient_bucket"] == report["planned_bucket"]


# glibc serves tensors up to 32 MiB from heaps that keep what is freed (its mmap threshold grows with
# use), so by default a CPU process's peak RSS also counts the allocator's fragmentation: the second
# micro-batch's activations land beside, not in, the first's. With a fixed threshold every large tensor
# is its own mapping, returned when freed, and RSS follows the live bytes as a GPU's allocator
# statistics do. The default's figures are in docs/planning.md.
LIVE_BYTES_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
MODEL_84M = ["model.hidden_size=768", "model.num_layers=12", "model.num_attention_heads=12",
             "train.seq_length=256", "train.micro_batch_size=4", "train.global_batch_size=8"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("processes,overrides", [
    (2, ["parallel.zero_stage=1", "parallel.data=2", "train.global_batch_size=16"]),
    (2, ["parallel.zero_stage=0", "parallel.pipeline=2"]),
], ids=["zero1-dp2", "pp2"])
def test_the_whole_estimate_is_within_a_quarter_of_peak_memory(tmp_path, sample_cache, processes, overrides):
    """ZeRO 1 sharding the optimizer state over data 2 with one micro-batch's activations in flight, and ZeRO 0
    (every state whole) under pipeline 2 with several; between them every term of the estimate."""
    report = _engine_report(tmp_path, sample_cache, processes, *MODEL_84M, *overrides, env=LIVE_BYTES_ALLOCATOR)
    # rank 0's report: the first stage's, which the plan describes
    assert report["estimated_total"] == pytest.approx(report["peak_rss_growth"], rel=0.25), report
    assert_states_are_the_bytes_deepspeed_allocates(report)


def test_the_176b_dry_run_under_slurm_prints_the_plan():
    result = subprocess.run([sys.executable, "-m", "bloomtrain.launch", "experiment=bloom-176b",
                             "launch.dry_run=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "384 processes = tensor 4 x pipeline 12 x data 8 (ZeRO 1) on 48 nodes" in out
    assert "#SBATCH --nodes=48" in out and "#SBATCH --gpus-per-node=8" in out
    config = load_config(["experiment=bloom-176b"])
    plan = plan_of(config, PlannedLayout(4, 12, 8, zero_stage=1, micro_batch_size=2, activation_checkpointing=True))
    assert f"memory per GPU    : {plan.memory.total / GIB:,.1f} GiB of 80 GiB (A100-80GB)" in out
    assert f"  parameters      : {stage_parameters(config.model, 4, 12)[0] * 2 / GIB:,.2f} GiB" in out
    assert "12 micro-batches in flight" in out and "tokens per step   : 4,194,304" in out
    assert "95,151 steps, 366.0B tokens" in out and "DOES NOT FIT" not in out  # 12,658 of them ramping up


def test_a_layout_that_does_not_fit_is_flagged():
    result = subprocess.run([sys.executable, "-m", "bloomtrain.launch", "experiment=bloom-176b", "launch.nodes=1",
                             "parallel.pipeline=2", "parallel.tensor=4", "launch.dry_run=true"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "DOES NOT FIT" in result.stdout
    assert "does not fit launch.gpu=A100-80GB; try python -m bloomtrain.plan launch.suggest=true" in result.stderr


def test_the_suggester_finds_bigscience_layout_and_explains_its_choice():
    config = load_config(["experiment=bloom-176b"])
    plans, considered = suggest(config, top=0)
    assert considered > 50 and all(plan.fits for plan in plans)
    assert any((p.layout.tensor, p.layout.pipeline, p.layout.data) == (4, 12, 8) for p in plans)
    assert all(p.layout.tensor <= 8 for p in plans)  # tensor parallelism stays within a node
    times = [plan.step.total for plan in plans]
    assert times[0] <= min(times) * 1.001
    result = subprocess.run([sys.executable, "-m", "bloomtrain.plan", "experiment=bloom-176b", "launch.suggest=true"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(plans)} of {considered} layouts of 384 x A100-80GB fit bloom-176b" in result.stdout
    assert f"why {plans[0].layout.describe()}:" in result.stdout and "optimizer state" in result.stdout


def test_the_plan_states_what_evaluation_costs(tmp_path, sample_cache):
    """Languages x eval.iters forward-only global batches every eval.interval steps, in time and as a share of
    training: BLOOM-176B's step makes 16 languages x 10 batches every 100 steps hours of work."""
    blend = next(sample_cache.glob("sample-*/blend.json"))
    config = load_config(["experiment=bloom-176b", f"data.blend={blend}", "eval.interval=100", "eval.iters=10"])
    plan = plan_of(config, layout_of(config, 8))
    minutes = 16 * 10 * plan.step.compute_s / 3 / 60
    assert f"16 languages x 10 batches every 100 steps: {minutes:,.1f} min each" in plan.table()
    assert minutes > 60 and f"{minutes * 60 / (100 * plan.step.total):.1%} of training" in plan.table()
    assert "evaluation        : off" in plan_of(load_config(["experiment=bloom-176b", "eval.interval=0"]),
                                                layout_of(config, 8)).table()


def test_collective_bounds_follow_the_step_and_a_176b_step_never_trips_them():
    """bloom-tiny's 0.1 s step: a minute (the floor); BLOOM-176B's planned step: 20 of them, far above a healthy
    step's wait; evaluation and saves get the start-up bound back."""
    from bloomtrain.health import CollectiveBounds, hang_warning_seconds

    applied = []
    tiny = CollectiveBounds(600, 20, 60, applied.append)
    for _ in range(5):
        tiny.record(0.1)
    assert applied == [60] and hang_warning_seconds(tiny.median_step, 300, 10) == 30
    with tiny.long_phase():
        assert applied[-1] == 600
    assert applied[-1] == 60

    config = load_config(["experiment=bloom-176b"])
    step = plan_of(config, layout_of(config, 8)).step.total
    bloom = CollectiveBounds(600, 20, 60, applied.append)
    for _ in range(3):
        bloom.record(step)
    assert bloom.current == 20 * step > 40 * 60  # 47 minutes: a healthy step waits at most one step
    assert hang_warning_seconds(bloom.median_step, 300, 10) == 10 * step
