"""Everything bloomtrain changes so that megatron-core and DeepSpeed run on a machine without CUDA.

Applied once, by :func:`apply_cpu_accommodations`, only when ``torch.cuda.is_available()`` is false; on
GPUs nothing here runs and the same model and engine code uses NCCL and CUDA memory.

1. megatron-core allocates some buffers with ``device=torch.cuda.current_device()`` (all-gather outputs
   in ``tensor_parallel/mappings.py`` and ``layers.py``). On a CPU-only build that call raises, so it is
   routed to the CPU.
2. DeepSpeed's CPU accelerator reports fp16 as unsupported and refuses ``fp16.enabled``. PyTorch's CPU
   kernels do run fp16, and the test suite must exercise DeepSpeed's dynamic loss scaling, so the
   accelerator is told fp16 is available.
3. megatron-core's parallel layers are created with ``use_cpu_initialization=True`` (see
   :func:`bloomtrain.parallel.tensor_parallel.megatron_layer_config`), which puts their parameters on
   the CPU instead of the current CUDA device.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_accommodations() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")  # (1)

    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    type(accelerator).is_fp16_supported = lambda self: True  # (2)
    _applied = True
