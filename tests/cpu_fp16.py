"""``python -m bloomtrain.train`` with DeepSpeed's CPU accelerator told that fp16 is available.

Test-only. DeepSpeed's CPU accelerator reports fp16 only where oneDNN has fp16 kernels, and the
product refuses fp16 elsewhere; PyTorch's CPU kernels run fp16 on any CPU, so the suite can exercise
DeepSpeed's dynamic loss scaling everywhere:

    torchrun --nproc_per_node N -m tests.cpu_fp16 key=value ...
"""

from __future__ import annotations

import sys


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True
    from bloomtrain.train import main as train

    return train()


if __name__ == "__main__":
    sys.exit(main())
