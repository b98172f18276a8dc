"""Process-group start-up shared by every entry point.

A lone ``python -m bloomtrain.train`` still forms a process group (a world of one), because
megatron-core's datasets and parallel layers ask ``torch.distributed`` for ranks. Under ``torchrun``
the usual RANK / WORLD_SIZE / MASTER_* variables are used as given; under a bare ``srun`` they are
made from SLURM's (``slurm_rank_environment``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bloomtrain.console import library_prints


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a single machine's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment() -> int:
    """Make sure RANK / WORLD_SIZE / MASTER_* are set (from SLURM's variables under a bare srun, a world
    of one when run alone); returns the world size."""
    if "RANK" not in os.environ:
        os.environ.update(slurm_rank_environment() or dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    return int(os.environ["WORLD_SIZE"])


def bound_collectives(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on.

    DeepSpeed's pipeline and megatron-core create groups of their own without a timeout argument, and
    torch then uses its module-level default (30 minutes) instead of the world group's; setting that
    default is the one place that reaches them all."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def set_collective_timeout(seconds: float) -> None:
    """Bound every collective of every process group this rank belongs to (megatron-core's and DeepSpeed's
    included) at ``seconds`` from now on."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        with contextlib.suppress(ValueError, RuntimeError, AssertionError):
            distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def join_process_group(device_preference: str = "auto", timeout_minutes: float = 10.0) -> DistributedContext:
    """Join (or, run alone, create) the default process group: NCCL on GPUs, gloo on CPU. Every
    collective gives up after ``timeout_minutes`` (``distributed.timeout_minutes``). torch only: what the
    run decides before anything else is imported or written (the run directory's lock) can use it."""
    prepare_environment()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_preference == "auto" else device_preference == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    bound_collectives(timeout)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistributedContext(rank, world_size, local_rank, device)


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 10.0) -> DistributedContext:
    """:func:`join_process_group`, then DeepSpeed's communication layer over the same group."""
    context = join_process_group(device_preference, timeout_minutes)
    import deepspeed

    # DeepSpeed's comm layer adopts the torch group (on CPU it builds, and announces, a communication op)
    with library_prints():
        deepspeed.init_distributed(dist_backend="nccl" if context.device.type == "cuda" else "gloo",
                                   timeout=timedelta(minutes=timeout_minutes))
    return context


def shutdown_distributed(together: bool = True) -> None:
    """Leave together (a rank that exits while a peer still talks to it makes gloo report a failure),
    or, after an error, at once."""
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def slurm_rank_environment() -> dict[str, str] | None:
    """torch.distributed's variables from SLURM's under a bare ``srun python -m bloomtrain.train``
    (None elsewhere): rank = SLURM_PROCID, world = the step's tasks, master = the step's first node."""
    if "SLURM_STEP_NUM_TASKS" not in os.environ or "SLURM_PROCID" not in os.environ:
        return None
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    listed = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
    head = listed.stdout.split()[0] if listed.returncode == 0 and listed.stdout.split() else "127.0.0.1"
    # Every task of a step must pick the same port without talking to each other: derive it from the ids.
    job, step = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0"))
    port = os.environ.get("MASTER_PORT") or str(20000 + (job * 16 + step) % 30000)
    return {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"), "MASTER_ADDR": os.environ.get("MASTER_ADDR", head),
            "MASTER_PORT": port}
