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

fp16 is not enabled on CPU: DeepSpeed's CPU accelerator refuses it, and so does bloomtrain at start-up
(``engine.check_precision_supported``). The test suite alone tells DeepSpeed otherwise, to exercise
its loss scaling on CPU (``tests/cpu_fp16.py``).
"""

from __future__ import annotations

import torch

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
