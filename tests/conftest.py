"""Shared fixtures and helpers: the bundled sample prepared once per session, runs of training under
one process or torchrun, a tiny BLOOM-style Hugging Face tokenizer, and a real one-node SLURM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from bloomtrain.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

# Keep W&B and every cache inside the test's temporary folders, never in the user's home.
os.environ.setdefault("WANDB_SILENT", "true")
# megatron-core warns at import (during collection, before pytest's filters apply) that TE/Apex are absent.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start several processes or use SLURM are slow too: ``-m "not slow"`` is the fast tier."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    from data_tools.sample import prepare_sample

    cache = tmp_path_factory.mktemp("cache")
    prepare_sample(cache)
    return cache


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory, sample_cache) -> Path:
    """A finished two-step tiny run with its checkpoint at step 2 (one warm-up step, the LR decaying over
    six, so it continues to step 6). Tests copy it (:func:`copy_run`) instead of training their own."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    run_train(tiny_run(run_dir, sample_cache, "optimizer.warmup_steps=1", "optimizer.decay_steps=6",
                       "train.max_steps=2"))
    return run_dir


def copy_run(run_dir: Path, destination: Path) -> Path:
    shutil.copytree(run_dir, destination)
    return destination


def tiny_run(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """The overrides every test's training run starts from: the quickstart's bloom-tiny on the bundled sample
    at sequence 64 with two warm-up steps, and nothing a test does not ask for (no W&B, no TensorBoard, no
    evaluation; MFU's peak given, see :func:`with_a_given_peak`). ``extra`` comes last, and a later key wins."""
    return ["experiment=quickstart", f"run.dir={run_dir}", f"data.cache_dir={cache}", "train.seq_length=64",
            "optimizer.warmup_steps=2", "logging.wandb.mode=disabled", "logging.tensorboard=false",
            "eval.interval=0", "train.peak_tflops=1", *extra]


def with_a_given_peak(overrides: list[str]) -> list[str]:
    """MFU's peak given (``train.peak_tflops=1``) unless the test sets it: measuring it takes rank 0 about
    15 s of matmuls per run on this CPU, while the other ranks wait. ``tests/test_metrics.py`` tests the
    measurement, and the quickstart test runs with it, as a user's run does."""
    return list(overrides) if any(item.startswith("train.peak_tflops=") for item in overrides) else [
        *overrides, "train.peak_tflops=1"]


def run_train(overrides: list[str], cwd: Path = REPO, check: bool = True, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bloomtrain.train`` as a user would; returns the finished process."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    result = run_process([sys.executable, "-m", "bloomtrain.train", *with_a_given_peak(overrides)], cwd, full_env,
                         timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_torchrun(processes: int, overrides: list[str], check: bool = True, timeout: float = 900,
                 env: dict[str, str] | None = None, module: str = "bloomtrain.train") -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node N -m MODULE`` on 127.0.0.1 (gloo on CPU)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    if module in ("bloomtrain.train", "tests.cpu_fp16", "tests.distributed_checks"):
        overrides = with_a_given_peak(overrides)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *overrides]
    result = run_process(command, REPO, full_env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_process(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` to the end; on a timeout end it and every process under it (torchrun's ranks sit in
    sessions of their own, and a rank left spinning would slow every later test), then fail."""
    from bloomtrain.launch.local import end_process_tree

    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process_tree(process.pid, grace_seconds=5)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command[:4])}... did not finish in {timeout:.0f} s:\n{stdout[-3000:]}\n"
                             f"{stderr[-5000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def save_byte_level_bpe(texts: list[str], vocab_size: int, out_dir: Path, **special_tokens: str) -> Path:
    """A tiny BLOOM-style tokenizer (byte-level BPE, BLOOM's special tokens at ids 0-3) trained on
    ``texts`` with Hugging Face ``tokenizers`` and saved as a model folder would hold it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", **special_tokens}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(out_dir)
    return out_dir


def read_wandb_history(run_dir: Path) -> list[dict]:
    """The history rows (``run.log`` calls) of every offline W&B session of a run, read from W&B's own
    transaction logs (``run-*.wandb``: a 7-byte W&B header, then LevelDB-style log records in 32 KiB blocks,
    each a ``Record`` protobuf)."""
    import json

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, position, pending = path.read_bytes(), 7, b""
        while position + 7 <= len(data):
            room = 32768 - position % 32768
            length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
            if room < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
                position += room
                continue
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def _usable_partition() -> str:
    """The cluster's default partition (``local`` when ``launch/local_slurm.sh`` configured it; a cluster
    already running with another configuration has its own), else its first one that is up."""
    listed = subprocess.run(["sinfo", "--noheader", "--format=%P %a"], capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in listed.stdout.splitlines() if line.strip()]
    up = [name for name, state in rows if state == "up"]
    default = [name.rstrip("*") for name in up if name.endswith("*")]
    if not default and not up:
        pytest.fail(f"the running SLURM has no partition that is up:\n{listed.stdout}{listed.stderr}")
    return (default or up)[0].rstrip("*")


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[str]:
    """A real one-node SLURM cluster started by ``launch/local_slurm.sh`` (root, Debian's packages);
    yields its partition. Outside CI a machine without them skips; ``.ci/run`` installs them and sets
    BLOOMTRAIN_REQUIRE_SLURM=1, which turns a missing SLURM into a failure."""
    import shutil

    problem = None
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        problem = "SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    elif os.geteuid() != 0:
        problem = "starting SLURM's daemons needs root"
    if problem:
        if os.environ.get("BLOOMTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    script = REPO / "launch" / "local_slurm.sh"
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=180)
    if started.returncode:
        pytest.fail(f"could not start the local SLURM:\n{started.stdout}\n{started.stderr}")
    yield _usable_partition()
    if "already running" not in started.stdout:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=60)
