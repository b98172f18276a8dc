"""3D parallelism equals single-process training (CPU, gloo, fp32, bloom-tiny, same seed and data)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from bloomtrain.config import ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.metrics import EVAL_FILE, read_metrics
from bloomtrain.model import Bloom, count_parameters
from bloomtrain.parallel.layout import ParallelLayout, resolve_layout
from tests.conftest import REPO, run_torchrun, tiny_run

STEPS = 5


def _overrides(run_dir, cache, *extra):
    # A small clip makes clipping active, so a wrong global gradient norm would change the losses.
    return tiny_run(run_dir, cache, f"train.max_steps={STEPS}", "optimizer.grad_clip=0.3", "checkpoint.interval=0",
                    *extra)


def _train(tmp_path, cache, name, tensor=1, pipeline=1, data=1, *extra, reports=False):
    """The run's metrics; with ``reports`` it runs under ``tests.distributed_checks``, whose per-rank
    reports land in ``tmp_path / (name + "-reports")``."""
    run_dir = tmp_path / name
    if not any(item.startswith("parallel.zero_stage=") for item in extra):
        # ZeRO 0 unless a test says otherwise: its fp32 path clips with our own global-norm AdamW.
        extra = ("parallel.zero_stage=0", *extra)
    overrides = _overrides(run_dir, cache, f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}", *extra)
    # fp16 on CPU needs DeepSpeed's CPU accelerator told that fp16 works (test-only, see tests/cpu_fp16.py).
    module = "tests.cpu_fp16" if "train.precision=fp16" in extra else "bloomtrain.train"
    if reports:
        module, overrides = "tests.distributed_checks", [str(tmp_path / f"{name}-reports"), *overrides]
    run_torchrun(tensor * pipeline * data, overrides, module=module)
    return read_metrics(run_dir)


def _assert_parameters_split(reports: list[dict], tensor: int, pipeline: int, data: int) -> None:
    """Each tensor rank's stages together hold the model once: its share of every split parameter, every
    replicated one whole (the tied embedding, on the first and last stage, counted once)."""
    config = load_config(["experiment=quickstart"]).model
    total = count_parameters(config)
    with torch.device("meta"):
        plain = Bloom(config)
    replicated = sum(p.numel() for name, p in plain.named_parameters()
                     if "layernorm" in name or "ln_f" in name or name.endswith(("dense.bias", "dense_4h_to_h.bias")))
    assert len(reports) == tensor * pipeline * data
    for report in reports:
        mine = [r for r in reports
                if (r["tensor_rank"], r["data_rank"]) == (report["tensor_rank"], report["data_rank"])]
        assert {r["pipeline_rank"] for r in mine} == set(range(pipeline))
        held = sum(r["local_parameters"] for r in mine) - (mine[0]["embedding_parameters"] if pipeline > 1 else 0)
        assert held == (total - replicated) // tensor + replicated
        assert report["local_parameters"] <= total / (tensor * pipeline) + replicated + report["embedding_parameters"]


EVALUATED = (f"eval.interval={STEPS}", "eval.iters=1")  # once, after the last step: the curve is unchanged


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, sample_cache):
    """The single-process run every layout is compared with, evaluated after its last step."""
    run_dir = tmp_path_factory.mktemp("reference")
    _train(run_dir, sample_cache, "single", 1, 1, 1, *EVALUATED)
    return run_dir / "single"


@pytest.fixture(scope="module")
def reference(reference_dir):
    return read_metrics(reference_dir)


def _assert_same_curve(metrics, reference, rel=1e-5):
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for got, want in zip(metrics, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=rel), (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert reference[-1]["loss"] < reference[0]["loss"]


@pytest.mark.multiprocess
# Each engine path alone and combined: tensor, pipeline and data parallel alone; tensor x data on the plain
# engine; all three on the pipeline engine (which covers tensor x pipeline and pipeline x data).
@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2), (2, 2, 2)],
                         ids=lambda layout: "tp{}-pp{}-dp{}".format(*layout))
def test_layout_equals_single_process(layout, tmp_path, sample_cache, reference, reference_dir):
    """The loss curve, and validation per language (forward only, pipeline included, over the same fixed
    samples, reduced over data parallel), equal the single process's; each rank holds its share of the
    parameters."""
    _assert_same_curve(_train(tmp_path, sample_cache, "run", *layout, *EVALUATED, reports=True), reference)
    reports = [json.loads(path.read_text()) for path in sorted((tmp_path / "run-reports").glob("rank_*.json"))]
    _assert_parameters_split(reports, *layout)
    evaluation, single = read_metrics(tmp_path / "run", EVAL_FILE), read_metrics(reference_dir, EVAL_FILE)
    assert [e["step"] for e in single] == [e["step"] for e in evaluation] == [STEPS]
    assert len(single[0]["languages"]) == 16
    assert evaluation[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    for language, values in single[0]["languages"].items():
        got = evaluation[0]["languages"][language]
        assert got["loss"] == pytest.approx(values["loss"], rel=1e-5), language
        assert got["tokens"] == values["tokens"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout,extra", [
    ((2, 1, 1), ()),
    ((2, 2, 1), ()),
    ((2, 1, 2), ("parallel.zero_stage=1", "parallel.activation_checkpointing=true")),
], ids=["tp2", "tp2-pp2", "tp2-dp2-zero1-ac"])
def test_sequence_parallel_equals_single_process(layout, extra, tmp_path, sample_cache, reference):
    _assert_same_curve(_train(tmp_path, sample_cache, "run", *layout, "parallel.sequence_parallel=true", *extra),
                       reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_equal_zero_0(stage, tmp_path, sample_cache, reference):
    _assert_same_curve(_train(tmp_path, sample_cache, "run", 1, 1, 2, f"parallel.zero_stage={stage}"), reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("pipeline", [1, 2], ids=["single", "pp2"])
def test_activation_checkpointing_recomputes_and_changes_nothing(pipeline, tmp_path, sample_cache, reference):
    """Each block runs twice per micro-batch (forward, then recomputed in backward) and the curve is the same."""
    reports = _rank_reports(tmp_path, sample_cache, pipeline, f"parallel.pipeline={pipeline}",
                            "parallel.zero_stage=0", "parallel.activation_checkpointing=true")
    assert all(r["layernorm_calls_per_micro_batch"] == 2 for r in reports), reports
    _assert_same_curve(read_metrics(tmp_path / "run"), reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision,layout,zero", [("bf16", (2, 2, 1), 1), ("fp16", (1, 1, 2), 2),
                                                   ("bf16", (1, 1, 1), 0)])
def test_half_precision_tracks_fp32(precision, layout, zero, tmp_path, sample_cache, reference):
    # The peak is given: measuring half-precision matmuls on a CPU can take many minutes, and this test
    # is about the numbers, not MFU.
    metrics = _train(tmp_path, sample_cache, "run", *layout, f"train.precision={precision}",
                     f"parallel.zero_stage={zero}", "train.peak_tflops=1.0")
    for got, want in zip(metrics, reference, strict=True):
        assert got["loss"] == got["loss"]  # not NaN
        assert got["loss"] == pytest.approx(want["loss"], rel=0.01)
        if precision == "fp16":  # DeepSpeed's dynamic loss scale, reported every step
            assert got["loss_scale"] >= 1 and got["skipped_steps"] >= 0
        else:
            assert got["loss_scale"] is None
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def _rank_reports(tmp_path, sample_cache, processes, *overrides):
    out = tmp_path / "reports"
    run_torchrun(processes, [str(out), *_overrides(tmp_path / "run", sample_cache, *overrides)],
                 module="tests.distributed_checks")
    return [json.loads((out / f"rank_{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_layernorms_stay_bitwise_equal_across_tensor_ranks(sequence_parallel, tmp_path, sample_cache):
    reports = _rank_reports(tmp_path, sample_cache, 2, "parallel.tensor=2", "train.precision=bf16",
                            "parallel.zero_stage=1", f"parallel.sequence_parallel={sequence_parallel}")
    assert all(r["replicated_tensors"] > 0 and r["replicated_equal"] for r in reports)
    # Sequence parallelism really splits the LayerNorms' activations (train.seq_length=64 over 2 ranks).
    assert all(r["layernorm_seq_lengths"] == [32 if sequence_parallel else 64] for r in reports)


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.tensor=3"], 3, "parallel.tensor=3"),
    (["parallel.pipeline=5"], 5, "parallel.pipeline=5"),
    (["parallel.tensor=2"], 3, "start a multiple of 2 processes"),
    (["parallel.data=2"], 4, "parallel.data=2"),
    (["parallel.data=2", "train.global_batch_size=8", "train.micro_batch_size=8"], 2, "train.global_batch_size=8"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage=2"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "train.seq_length=63"], 2, "train.seq_length=63"),
])
def test_invalid_layouts_name_the_key(overrides, world, key):
    config = load_config(["experiment=quickstart", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        resolve_layout(config, world)
    assert "\n" not in str(error.value)


def test_invalid_layout_stops_before_any_process_group(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bloomtrain.train", "parallel.tensor=2", f"run.dir={tmp_path}/r"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "parallel.tensor=2" in result.stderr
    assert not (tmp_path / "r").exists()


def test_a_precision_the_accelerator_cannot_run_is_refused(monkeypatch):
    """fp16 on a CPU without oneDNN fp16 kernels: one line naming the key, before DeepSpeed sees it."""
    from deepspeed.accelerator import get_accelerator

    from bloomtrain.parallel.engine import check_precision_supported

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16 .*; use train\.precision=fp32, bf16$"):
        check_precision_supported("fp16")
    check_precision_supported("bf16")
    check_precision_supported("fp32")


def test_sequence_parallel_is_off_without_tensor_parallelism():
    config = load_config(["experiment=quickstart", "parallel.sequence_parallel=true"])
    assert not resolve_layout(config, 2).sequence_parallel
    config = load_config(["experiment=quickstart", "parallel.sequence_parallel=true", "parallel.tensor=2"])
    assert resolve_layout(config, 2).sequence_parallel


@pytest.mark.parametrize("tensor,pipeline,data", [(2, 2, 2), (4, 3, 2), (1, 4, 3), (8, 1, 1)])
def test_rank_order_is_megatron_cores_and_deepspeeds(tensor, pipeline, data):
    """layout.py's coordinates are what both libraries' groups make of the same ranks."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core.parallel_state import RankGenerator

    from bloomtrain.parallel.groups import MEGATRON_ORDER

    layout = ParallelLayout(tensor=tensor, pipeline=pipeline, data=data, zero_stage=0)
    megatron = RankGenerator(tp=tensor, ep=1, dp=data, pp=pipeline, cp=1, order=MEGATRON_ORDER)
    position = {kind: {rank: group.index(rank) for group in megatron.get_ranks(kind) for rank in group}
                for kind in ("tp", "pp", "dp")}
    deepspeed = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    for rank in range(layout.world_size):
        coordinates = layout.coordinates(rank)
        assert coordinates == (position["tp"][rank], position["pp"][rank], position["dp"][rank])
        ds = deepspeed.get_coord(rank)
        assert coordinates == (ds.model, ds.pipe, ds.data)
    if (tensor, pipeline, data) == (2, 2, 2):  # the documented example: tensor peers adjacent, stages last
        assert [layout.coordinates(rank) for rank in range(8)] == [
            (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]


@pytest.fixture
def process_group_of_one():
    """A real one-process gloo group with megatron-core's groups, for building parallel modules in-process."""
    import os

    import torch.distributed as dist

    from bloomtrain.distributed import free_port, init_distributed
    from bloomtrain.parallel.cpu import apply_cpu_accommodations
    from bloomtrain.parallel.groups import destroy_parallel_groups, init_parallel_groups

    saved = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    apply_cpu_accommodations()
    init_distributed("cpu")
    layout = ParallelLayout(tensor=1, pipeline=1, data=1, zero_stage=0)
    init_parallel_groups(layout)
    yield layout
    destroy_parallel_groups()
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_pipeline_layer_table_names_every_parameter(process_group_of_one):
    """The table that builds the pipeline's LayerSpecs also maps its parameter names: they must agree."""
    from bloomtrain.parallel.names import pipeline_layers, pipeline_names, plain_name
    from bloomtrain.parallel.pipeline import build_pipeline_module

    config = load_config(["experiment=quickstart", "model.num_layers=3"]).model
    padded = config.padded_vocab_size(1)
    module = build_pipeline_module(config, process_group_of_one, padded, seed=0, activation_checkpointing=False)
    plain = Bloom(config, padded)
    plain_shapes = {name: p.shape for name, p in plain.named_parameters()}
    mapped = {}
    for name, param in module.named_parameters():
        mapped[name] = plain_name(name, config.num_layers)
        assert plain_shapes[mapped[name]] == param.shape, name
    assert sorted(mapped.values()) == sorted(plain_shapes)  # every plain parameter exactly once
    assert pipeline_names(config.num_layers, list(plain_shapes)) == {v: k for k, v in mapped.items()}
    table = pipeline_layers(config.num_layers)
    assert len(module.forward_funcs) == len(table)
    # DeepSpeed writes a layer file exactly for the entries the table says are saved.
    assert [hasattr(f, "state_dict") for f in module.forward_funcs] == [layer.saved for layer in table]
    for index, (function, layer) in enumerate(zip(module.forward_funcs, table, strict=True)):
        if layer.saved:
            for key in function.state_dict():
                assert plain_name(f"{index}.{key}", config.num_layers) in plain_shapes


@pytest.mark.slow
def test_single_process_matches_the_golden_curve(reference):
    """The tiny model's first steps, pinned: any change to init, data order, schedule or math shows here."""
    golden = json.loads((REPO / "tests" / "golden" / "bloom_tiny_fp32.json").read_text())
    assert [m["loss"] for m in reference] == pytest.approx(golden["loss"], rel=2e-5)
    assert [m["grad_norm"] for m in reference] == pytest.approx(golden["grad_norm"], rel=2e-4)


def test_a_stale_op_build_lock_is_removed_and_a_live_build_is_waited_for(tmp_path, monkeypatch, caplog):
    """torch's op builder waits forever on a ``lock`` that a killed build left behind (SIGTERM or SIGKILL
    end it before it can clean up): no process builds under it, so it is removed with a notice; a lock
    that a live build holds (its compiler works in the folder) is waited for, and the wait is said."""
    from bloomtrain.parallel import cpu

    monkeypatch.setattr(cpu, "BUILD_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(cpu, "WAIT_NOTICE_SECONDS", 0.5)
    stale = tmp_path / "stale" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    with caplog.at_level(logging.WARNING, logger="bloomtrain.parallel.cpu"):
        _within(10, cpu._wait_for_build_lock, stale)
    assert not (stale / "lock").exists() and "removed a stale build lock" in caplog.text

    caplog.clear()
    live = tmp_path / "live" / "deepspeed_shm_comm"
    live.mkdir(parents=True)
    (live / "lock").touch()
    builder = subprocess.Popen(["sh", "-c", "sleep 3; rm lock"], cwd=live)  # stands for ninja and the compiler
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bloomtrain.parallel.cpu"):
        _within(10, cpu._wait_for_build_lock, live)
    builder.wait()
    assert time.monotonic() - started >= 2.5  # it waited for the build to give the lock back
    assert "waiting for another process to finish compiling" in caplog.text and "removed" not in caplog.text


def _within(seconds: float, function, *args) -> None:
    """Call ``function`` in a thread; fail (instead of hanging the suite) when it has not returned in time."""
    import threading

    worker = threading.Thread(target=function, args=args, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{function.__name__} still waiting after {seconds} s"
