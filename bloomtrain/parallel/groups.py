"""Process groups for a layout: megatron-core's ``parallel_state``, and the adapter DeepSpeed expects."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from bloomtrain.parallel.layout import ParallelLayout

MEGATRON_ORDER = "tp-cp-ep-dp-pp"  # megatron-core's name for the rank order of ``layout.py``


def init_parallel_groups(layout: ParallelLayout, timeout_minutes: float = 10.0) -> None:
    """Create tensor / pipeline / data groups in the rank order documented in ``layout.py``."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        order=MEGATRON_ORDER,
        distributed_timeout_minutes=timeout_minutes,  # used as timedelta(minutes=...): fractions work
    )
    assert parallel_state.get_data_parallel_world_size() == layout.data


def destroy_parallel_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


class MegatronModelParallelUnit:
    """The ``mpu`` interface DeepSpeed's engine asks for (without pipeline parallelism), answered by
    megatron-core's groups: "model parallel" means tensor parallel here."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()
