"""One run's plan: its memory per GPU and step time for ``launch.gpu``, its tokens, steps and days."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.gpus import GPUS, Gpu
from bloomtrain.plan.memory import GIB, Memory, PlannedLayout, estimate_memory
from bloomtrain.plan.step_time import StepTime, estimate_step_time


@dataclass(frozen=True)
class Evaluation:
    """What validation costs: ``languages`` x ``iters`` global batches, forward only, every ``interval`` steps."""

    interval: int
    iters: int
    languages: int | None  # None: the blend is not readable here; the cost is then given per language

    def seconds(self, step_compute_s: float) -> float:
        """A global batch's forward is a third of its training compute (backward is twice the forward)."""
        return (self.languages or 1) * self.iters * step_compute_s / 3

    def describe(self, step_compute_s: float, step_s: float) -> str:
        each = self.seconds(step_compute_s)
        who = f"{self.languages} languages" if self.languages else "per language"
        return (f"{who} x {self.iters} batches every {self.interval:,} steps: {each / 60:,.1f} min each, "
                f"{each / (self.interval * step_s):.1%} of training")


@dataclass(frozen=True)
class Plan:
    layout: PlannedLayout
    memory: Memory
    gpu_name: str
    gpu_memory_bytes: float
    step: StepTime
    steps: int
    samples: int  # over all the steps, ramp-up included
    tokens_per_step: int  # of a full step
    mfu: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_bytes

    global_batch_size: int
    evaluation: Evaluation | None = None

    @property
    def days(self) -> float:
        """A ramp-up step costs its share of a full one."""
        return self.samples / self.global_batch_size * self.step.total / 86400

    @property
    def tokens(self) -> int:
        return self.samples * self.tokens_per_step // self.global_batch_size

    def table(self) -> str:
        m, g = self.memory, GIB
        rows = [
            ("layout", self.layout.describe()),
            ("memory per GPU", f"{m.total / g:,.1f} GiB of {self.gpu_memory_bytes / g:,.0f} GiB ({self.gpu_name})"
                               f"{'' if self.fits else '  -- DOES NOT FIT'}"),
            ("  parameters", f"{m.parameters / g:,.2f} GiB"),
            ("  gradients", f"{m.gradients / g:,.2f} GiB"),
            ("  optimizer state", f"{m.optimizer / g:,.2f} GiB"),
            ("  gradient bucket", f"{m.gradient_bucket / g:,.2f} GiB"),
            ("  activations", f"{m.activations / g:,.2f} GiB ({m.in_flight} micro-batch"
                              f"{'es' if m.in_flight > 1 else ''} in flight)"),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            ("step time", f"{self.step.total:,.2f} s at {self.mfu:.0%} MFU (compute {self.step.compute_s:.2f}, "
                          f"bubble {self.step.bubble_s:.2f}, data-parallel {self.step.data_parallel_s:.2f}, "
                          f"tensor-parallel {self.step.tensor_parallel_s:.2f})"),
            ("steps and days", f"{self.steps:,} steps, {self.tokens / 1e9:,.1f}B tokens, {self.days:,.1f} days"),
            ("evaluation", "off" if self.evaluation is None else
             self.evaluation.describe(self.step.compute_s, self.step.total)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}} : {value}" for name, value in rows)


def gpu_of(config: BloomTrainConfig) -> tuple[str, Gpu, float]:
    """(name, GPU, usable bytes) for ``launch.gpu`` / ``launch.gpu_memory_gb``."""
    launch = config.launch
    gpu = GPUS[launch.gpu]  # validated at start-up: one of gpus.PLANNED_GPUS
    memory = (launch.gpu_memory_gb or gpu.memory_gb) * GIB
    return launch.gpu, gpu, memory


def plan_of(config: BloomTrainConfig, layout: PlannedLayout) -> Plan:
    name, gpu, memory = gpu_of(config)
    train, launch = config.train, config.launch
    gpus_per_node = launch.slurm.gpus_per_node or 8
    return Plan(layout, estimate_memory(config.model, layout, train.precision, train.seq_length,
                                        train.global_batch_size), name, memory,
                estimate_step_time(config.model, layout, train.precision, train.seq_length, train.global_batch_size,
                                   gpu, launch.assumed_mfu, gpus_per_node),
                train.max_steps, run_samples(train.global_batch_size, ramp_of(config), train.max_steps),
                train.global_batch_size * train.seq_length, launch.assumed_mfu, train.global_batch_size,
                evaluation_of(config))


def evaluation_of(config: BloomTrainConfig) -> Evaluation | None:
    """The run's validation, with its languages counted from ``data.blend`` when that file is here."""
    if not config.eval.interval:
        return None
    languages = None
    if config.data.blend:
        from bloomtrain.data.blend import read_blend

        try:
            languages = len(read_blend(config.data.blend).validation_sets) or None
        except (OSError, ValueError):
            languages = None
    return Evaluation(config.eval.interval, config.eval.iters, languages)


def ramp_of(config: BloomTrainConfig) -> tuple[int, int, int] | None:
    ramp = config.train.rampup_batch_size
    return tuple(ramp) if ramp else None


@cache
def run_samples(global_batch_size: int, ramp: tuple[int, int, int] | None, steps: int) -> int:
    """Samples ``steps`` steps consume, ramp-up included (the schedule the trainer follows)."""
    from bloomtrain.data.loader import BatchLayout

    return BatchLayout(1, global_batch_size, rampup=ramp).samples_for(steps)


def layout_of(config: BloomTrainConfig, data: int) -> PlannedLayout:
    parallel = config.parallel
    return PlannedLayout(parallel.tensor, parallel.pipeline, data, parallel.zero_stage, parallel.sequence_parallel,
                         config.train.micro_batch_size, parallel.activation_checkpointing)


def plan_table(config: BloomTrainConfig, data: int) -> str:
    """The plan's table for a run with ``data`` data-parallel ranks, or why there is none."""
    try:
        return plan_of(config, layout_of(config, data)).table()
    except ConfigError as error:
        return f"no plan: {error}"
