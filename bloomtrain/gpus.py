"""The one table of GPUs bloomtrain knows: what the planner sizes runs for and where MFU's peak comes from.

Datasheet numbers, dense (never sparse) bf16/fp16 tensor-core peaks. Bandwidths are per GPU and one
direction: NVLink/NVSwitch within a node; between nodes, 4 x 200 Gb/s HDR per 8-GPU A100 or V100 node
and 8 x 400 Gb/s NDR per H100/H200 node. GPUs without bandwidths are known for their peak only (MFU);
the planner (``launch.gpu``) takes those with them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    device_name: str
    """A piece of ``torch.cuda.get_device_name()`` that identifies it."""
    memory_gb: float
    """GiB the framework can use."""
    half_precision_tflops: float
    """Dense bf16/fp16 peak."""
    intra_node_gb_s: float | None = None
    inter_node_gb_s: float | None = None

    @property
    def plannable(self) -> bool:
        return self.intra_node_gb_s is not None and self.inter_node_gb_s is not None


# Order matters for matching device names: "A100" before "A10".
GPUS = {
    "A100-40GB": Gpu("A100", 40, 312, 300, 12.5),
    "A100-80GB": Gpu("A100", 80, 312, 300, 12.5),
    "H100-80GB": Gpu("H100", 80, 989, 450, 50),
    "H200-141GB": Gpu("H200", 141, 989, 450, 50),
    "V100-32GB": Gpu("V100", 32, 125, 150, 12.5),
    "A10-24GB": Gpu("A10", 24, 125),
    "L40-48GB": Gpu("L40", 48, 181),
    "MI250-128GB": Gpu("MI250", 128, 362),
    "MI300X-192GB": Gpu("MI300", 192, 1307),
}

PLANNED_GPUS = tuple(name for name, gpu in GPUS.items() if gpu.plannable)


def gpu_for_device(device_name: str) -> Gpu | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), if it has one."""
    for gpu in GPUS.values():
        if gpu.device_name in device_name:
            return gpu
    return None
