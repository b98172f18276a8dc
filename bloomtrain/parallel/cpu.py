"""Everything bloomtrain does differently on a machine without CUDA; no other module has such code.

On GPUs none of this runs: the same model and engine code uses NCCL and CUDA memory. What each
accommodation is for:

1. :func:`apply_cpu_accommodations`, called once by the training entry point before megatron-core is
   imported:
   megatron-core allocates some buffers with ``device=torch.cuda.current_device()`` (all-gather
   outputs in ``tensor_parallel/mappings.py`` and ``layers.py``); on a CPU-only build that call
   raises, so it is routed to the CPU. (Which library notices reach the terminal is
   ``bloomtrain/console.py``'s business.)
2. :func:`initialize_on_cpu`: megatron-core's parallel layers are created with
   ``use_cpu_initialization`` (``tensor_parallel.megatron_layer_config``), which puts their
   parameters on the CPU instead of the current CUDA device.
3. :func:`threads_per_rank`: CPU ranks on one machine share its cores, so the launcher gives each
   ``cores / ranks`` threads instead of letting every rank take them all.
4. :func:`prepare_op_builds`: on CPU, DeepSpeed compiles its shared-memory communication op the first
   time a run starts. torch's builder guards the build folder with a ``lock`` file and waits, without a
   word and without end, while it exists; a run stopped mid-build (Ctrl-C, a scheduler's kill) leaves it
   behind, and every later run then hangs. Before DeepSpeed starts, a lock that no process on this
   machine is building under (and older than :data:`BUILD_GRACE_SECONDS`), or older than
   :data:`BUILD_ABANDONED_SECONDS` whoever holds it, is removed with a notice; waiting for a live build
   says so. Builds go to a folder per environment (``TORCH_EXTENSIONS_DIR``, unless set): two virtual
   environments, or nodes sharing a home directory, never build into one another's folder.

fp16 is not enabled on CPU: DeepSpeed's CPU accelerator refuses it, and so does bloomtrain at start-up
(``engine.check_precision_supported``). The test suite alone tells DeepSpeed otherwise, to exercise
its loss scaling on CPU (``tests/cpu_fp16.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEEPSPEED_CPU_OPS = ("deepspeed_shm_comm",)  # what deepspeed.init_distributed builds on a CPU accelerator
BUILD_GRACE_SECONDS = 10.0  # before its compiler starts, a live build has no process in its folder
BUILD_ABANDONED_SECONDS = 900.0  # a build elsewhere (a node sharing the folder) that took this long died
WAIT_NOTICE_SECONDS = 5.0

_applied = False


def apply_cpu_accommodations() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    _applied = True


def initialize_on_cpu() -> bool:
    return not torch.cuda.is_available()


def threads_per_rank(ranks_on_this_machine: int, cores: int) -> int | None:
    """OMP threads for each CPU rank, or None on a GPU machine (each rank drives its own device)."""
    if torch.cuda.is_available():
        return None
    return max(cores // ranks_on_this_machine, 1)


def extensions_dir() -> Path:
    """This environment's folder for compiled ops: ``TORCH_EXTENSIONS_DIR`` if set, else one named after the
    interpreter's prefix and the torch and DeepSpeed versions under ``~/.cache/torch_extensions``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from importlib.metadata import version

    key = f"{sys.prefix}|{torch.__version__}|{version('deepspeed')}"
    return Path.home() / ".cache" / "torch_extensions" / f"bloomtrain-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_op_builds() -> None:
    """Point torch's builder at this environment's folder and clear stale build locks (see above)."""
    if torch.cuda.is_available():
        return
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    for name in DEEPSPEED_CPU_OPS:
        _wait_for_build_lock(root / name)


def _wait_for_build_lock(build_dir: Path) -> None:
    lock, waiting_since, said = build_dir / "lock", time.monotonic(), False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        building = _builds_under(build_dir)
        if (not building and age > BUILD_GRACE_SECONDS) or age > BUILD_ABANDONED_SECONDS:
            lock.unlink(missing_ok=True)
            logger.warning("removed a stale build lock %s (%.0f s old, no process builds there): a run stopped while "
                           "DeepSpeed compiled its %s op; it is compiled again now", lock, age, build_dir.name)
            return
        if not said and time.monotonic() - waiting_since > WAIT_NOTICE_SECONDS:
            logger.warning("waiting for another process to finish compiling DeepSpeed's %s op (lock %s, %.0f s old)",
                           build_dir.name, lock, age)
            said = True
        time.sleep(0.5)


def _builds_under(build_dir: Path) -> bool:
    """Whether a process on this machine works in ``build_dir`` (torch runs ninja and the compiler there)."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.cwd() == str(build_dir):
                return True
        except psutil.Error:
            continue
    return False
