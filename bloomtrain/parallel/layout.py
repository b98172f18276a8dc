"""The (tensor, pipeline, data) layout of a run, validated before any process group exists.

Rank order. Global rank r holds the coordinates
    tensor   = r % T
    data     = (r // T) % D
    pipeline = r // (T * D)
i.e. tensor-parallel peers are adjacent ranks (on one node, where NVLink is), then data-parallel
replicas, then pipeline stages. This is megatron-core's default order (tp-dp-pp) and the order of
DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model, the last varying fastest), so
the two libraries' process groups coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

from bloomtrain.config import BloomTrainConfig, ConfigError

# DeepSpeed's default ZeRO 1/2 gradient bucket, in elements: allocated whole on every rank's device.
DEEPSPEED_REDUCE_BUCKET = 500_000_000


def gradient_bucket_elements(parameters: int) -> int:
    """ZeRO 1/2 copy each micro-batch's gradients into one preallocated bucket; DeepSpeed's default of
    5e8 elements costs 2 GB of fp32 on every GPU however small the model, so it is capped at the
    gradients this rank holds (the reduction then sees the same single bucket)."""
    return max(1, min(DEEPSPEED_REDUCE_BUCKET, parameters))


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tensor, pipeline, data) coordinates of a global rank."""
        return rank % self.tensor, rank // (self.tensor * self.data), (rank // self.tensor) % self.data


def resolve_layout(config: BloomTrainConfig, world_size: int) -> ParallelLayout:
    """The layout for ``world_size`` processes; a ConfigError names the key to change when it cannot work."""
    parallel, model, train = config.parallel, config.model, config.train
    tensor, pipeline = parallel.tensor, parallel.pipeline
    if model.num_attention_heads % tensor:
        raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
                          f"parallel.tensor={tensor}; choose a tensor size that divides the head count")
    if model.num_layers < pipeline:
        raise ConfigError(f"parallel.pipeline={pipeline} stages need at least that many layers, but "
                          f"model.num_layers={model.num_layers}; lower parallel.pipeline")
    if parallel.data == "auto":
        if world_size % (tensor * pipeline):
            raise ConfigError(f"{world_size} processes cannot hold parallel.tensor={tensor} x "
                              f"parallel.pipeline={pipeline}; start a multiple of {tensor * pipeline} processes")
        data = world_size // (tensor * pipeline)
    else:
        data = int(parallel.data)
        if tensor * pipeline * data != world_size:
            raise ConfigError(f"parallel.tensor={tensor} x parallel.pipeline={pipeline} x parallel.data={data} "
                              f"= {tensor * pipeline * data} but {world_size} processes were started; set "
                              f"parallel.data=auto or start {tensor * pipeline * data} processes")
    if train.global_batch_size % (train.micro_batch_size * data):
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {data}; "
                          f"make it a multiple of {train.micro_batch_size * data}")
    if train.rampup_batch_size:
        start, increment, _ = train.rampup_batch_size
        step = train.micro_batch_size * data
        if start % step or increment % step:
            raise ConfigError(f"train.rampup_batch_size={list(train.rampup_batch_size)}: every step's batch must be "
                              f"a multiple of train.micro_batch_size={train.micro_batch_size} x data-parallel size "
                              f"{data} = {step}, so the start ({start}) and the increment ({increment}) must be too")
    if pipeline > 1 and parallel.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={parallel.zero_stage} cannot be combined with "
                          f"parallel.pipeline={pipeline} (DeepSpeed's pipeline engine supports ZeRO 0 and 1); "
                          "set parallel.zero_stage=1 or parallel.pipeline=1")
    # As in Megatron-LM, sequence parallelism is simply off without tensor parallelism.
    sequence_parallel = parallel.sequence_parallel and tensor > 1
    if sequence_parallel and train.seq_length % tensor:
        raise ConfigError(f"parallel.sequence_parallel=true splits train.seq_length={train.seq_length} over "
                          f"parallel.tensor={tensor} ranks; make the sequence length a multiple of {tensor}")
    return ParallelLayout(tensor, pipeline, data, parallel.zero_stage, sequence_parallel)


def process_count(config: BloomTrainConfig) -> int:
    """All ranks of the run, over every node."""
    import torch

    parallel, launch = config.parallel, config.launch
    model_parallel = parallel.tensor * parallel.pipeline
    if launch.processes is not None:
        return launch.processes
    if parallel.data != "auto":
        total = model_parallel * int(parallel.data)
    else:
        if config.launcher == "slurm":
            per_node = launch.slurm.gpus_per_node
            if not per_node:
                raise ConfigError("launcher=slurm with parallel.data=auto needs launch.slurm.gpus_per_node "
                                  "(GPU nodes), or parallel.data / launch.processes (CPU nodes)")
        else:
            per_node = torch.cuda.device_count() if torch.cuda.is_available() else 0
        total = max(per_node * launch.nodes // model_parallel, 1) * model_parallel
    if total % launch.nodes:
        raise ConfigError(f"{total} processes do not divide evenly over launch.nodes={launch.nodes}; "
                          "change parallel.data or launch.nodes")
    return total
