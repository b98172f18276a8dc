"""Is the run healthy? One verdict per step from the checks on its numbers, and heartbeats for the launcher.

:class:`StepHealth` judges each step in the order that matters: a streak of non-finite steps, then
weights that became non-finite, then a loss spike (with the injection that tests that guard). A step
whose loss or gradients are not finite is skipped, counted, and the run stops when they keep coming.

DeepSpeed's optimizer wrappers skip a step whose gradient norm is NaN/Inf (ZeRO >= 1, bf16, fp16),
and bloomtrain's own clipping optimizer does the same under fp32 ZeRO 0
(``parallel/clipping.py``), so a non-finite step leaves the weights and the optimizer state as they
were. This module only decides what the trainer does next: carry on (the next batch may be fine), or,
after ``train.max_skipped_steps`` such steps in a row, stop without saving — the newest checkpoint
is the last good state — and exit with :data:`EXIT_DIVERGED`.

fp16's loss-scale overflows are DeepSpeed's normal business (it lowers the scale and retries) and are
not counted here unless the loss itself is not finite.

:class:`Heartbeat` is a thread per rank that rewrites ``RUN_DIR/heartbeats/rank-N.json`` (the last
finished step and the time); :func:`quiet_ranks` is how the launcher reads them to name a hung rank.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EXIT_DIVERGED = 3
"""Exit status after too many non-finite steps in a row: not worth requeueing as is."""


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass
class NonFiniteSteps:
    """Counts non-finite steps; ``record`` says whether the run must stop."""

    max_in_a_row: int
    in_a_row: int = 0
    total: int = 0
    first_step: int | None = None  # the first step of the current streak

    def record(self, step: int, loss: float, grad_norm: float | None, loss_scaling: bool) -> bool:
        """Note ``step``'s outcome; True when the streak has reached ``max_in_a_row``.

        ``grad_norm`` is None where it is not known (an fp16 overflow step, which DeepSpeed reports
        that way); under ``loss_scaling`` only a non-finite loss counts."""
        bad = not math.isfinite(loss) or (not loss_scaling and grad_norm is not None and not is_finite(grad_norm))
        if not bad:
            self.in_a_row, self.first_step = 0, None
            return False
        self.total += 1
        self.in_a_row += 1
        self.first_step = step if self.first_step is None else self.first_step
        return self.in_a_row >= self.max_in_a_row

    @property
    def last_step_was_bad(self) -> bool:
        return self.in_a_row > 0


class LossSpikes:
    """The loss-spike test: a loss above ``factor`` times the highest of the last ``window`` losses.

    BigScience's 104B runs diverged after such spikes; their remedy, automated here by the trainer, is
    to go back to a checkpoint from before the spike and skip the data that led to it."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        spike = len(self.recent) == self.recent.maxlen and loss > self.factor * max(self.recent)
        if not spike:
            self.recent.append(loss)
        return spike

    @property
    def threshold(self) -> float:
        return self.factor * max(self.recent)


class Action(enum.Enum):
    CARRY_ON = "carry on"
    DIVERGED = "stop: non-finite steps in a row"
    WEIGHTS_DIVERGED = "stop: non-finite weights"
    ROLL_BACK = "roll back: a loss spike"


@dataclass(frozen=True)
class Verdict:
    action: Action
    skipped: bool
    """The step's loss or gradients were not finite, so the optimizer skipped it."""
    reason: str = ""


class StepHealth:
    """Every check on a step's numbers, one verdict out. Order matters: a non-finite streak ends the run
    before anything else is looked at; weights that became NaN/Inf end it too; a loss spike asks for a
    rollback; a lone non-finite step is skipped and training carries on."""

    def __init__(self, max_skipped_steps: int, loss_scaling: bool, spike_factor: float = 0.0,
                 spike_window: int = 50, inject_spike_at: list[int] = (), inject_nonfinite_at: list[int] = ()) -> None:
        self.non_finite = NonFiniteSteps(max_skipped_steps)
        self.loss_scaling = loss_scaling
        self.spikes = LossSpikes(spike_factor, spike_window) if spike_factor else None
        self.inject_spike_at = set(inject_spike_at)
        self.inject_nonfinite_at = set(inject_nonfinite_at)

    def judge(self, step: int, loss: float, grad_norm: float | None, param_norm: float | None) -> Verdict:
        if step in self.inject_nonfinite_at:
            self.inject_nonfinite_at.discard(step)
            loss = math.nan
        diverged = self.non_finite.record(step, loss, grad_norm, self.loss_scaling)
        skipped = self.non_finite.last_step_was_bad
        if diverged:
            return Verdict(Action.DIVERGED, skipped)
        if param_norm is not None and not is_finite(param_norm):
            return Verdict(Action.WEIGHTS_DIVERGED, skipped)
        seen = loss
        if step in self.inject_spike_at:
            self.inject_spike_at.discard(step)  # once: the re-done step after a rollback is clean
            seen *= 1000
        if self.spikes is not None and math.isfinite(seen) and self.spikes.is_spike(seen):
            recent = self.spikes.recent
            return Verdict(Action.ROLL_BACK, skipped,
                           f"loss spike at step {step}: loss {seen:.4f} > {self.spikes.factor:g} x {max(recent):.4f} "
                           f"(the highest of the last {len(recent)} steps, train.loss_spike_factor)")
        return Verdict(Action.CARRY_ON, skipped)


class CollectiveBounds:
    """How long a collective may wait, relative to the step. Until ``warmup_steps`` steps are timed, and
    around phases with a pace of their own (evaluation, checkpoint saving), the bound is the start-up one
    (``distributed.timeout_minutes``); afterwards a step's collectives give up after ``factor`` median steps,
    at least ``minimum_seconds``. ``apply`` sets a bound on every process group (local: no communication)."""

    def __init__(self, startup_seconds: float, factor: float, minimum_seconds: float,
                 apply: Callable[[float], None], warmup_steps: int = 3) -> None:
        self.startup_seconds, self.factor, self.minimum_seconds = startup_seconds, factor, minimum_seconds
        self.apply, self.warmup_steps = apply, warmup_steps
        self.step_times: collections.deque[float] = collections.deque(maxlen=50)
        self.current = startup_seconds

    @property
    def median_step(self) -> float | None:
        return statistics.median(self.step_times) if len(self.step_times) >= self.warmup_steps else None

    @property
    def step_bound(self) -> float:
        median = self.median_step
        if median is None or not self.factor:
            return self.startup_seconds
        return max(self.minimum_seconds, self.factor * median)

    def record(self, step_seconds: float) -> None:
        self.step_times.append(step_seconds)
        bound = self.step_bound
        if abs(bound - self.current) > 0.25 * self.current:  # not every step: it walks every process group
            self._set(bound)

    @contextlib.contextmanager
    def long_phase(self) -> Iterator[None]:
        """Evaluation or a checkpoint save: the start-up bound while it lasts."""
        if self.current < self.startup_seconds:
            self._set(self.startup_seconds)
        try:
            yield
        finally:
            if self.step_bound < self.current:
                self._set(self.step_bound)

    def _set(self, seconds: float) -> None:
        self.apply(seconds)
        self.current = seconds


HEARTBEAT_DIR = "heartbeats"


class Heartbeat:
    """``RUN_DIR/heartbeats/rank-N.json``, rewritten every few seconds by a thread: the step this rank
    last finished and the time. A rank that is stopped, deadlocked or stuck in I/O stops writing while
    its peers (waiting for it in a collective) go on, so the launcher sees which rank hangs long before
    the collective times out."""

    def __init__(self, run_dir: Path, rank: int, interval_seconds: float = 5.0) -> None:
        self.path = Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.step_seconds: float | None = None  # the median step, once known: the launcher's warning follows it
        self._stopped = threading.Event()
        self._interval = interval_seconds
        self._write()
        threading.Thread(target=self._run, name="bloomtrain-heartbeat", daemon=True).start()

    def _write(self) -> None:
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps({"step": self.step, "time": time.time(), "step_seconds": self.step_seconds}))
        staging.replace(self.path)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            with contextlib.suppress(OSError):  # a full disk must not end training from this thread
                self._write()

    def stop(self) -> None:
        self._stopped.set()


def hang_warning_seconds(step_seconds: float | None, startup_seconds: float, factor: float,
                         minimum_seconds: float = 30.0) -> float:
    """How long a rank's heartbeat may be silent before the launcher names it: ``factor`` median steps (at
    least ``minimum_seconds``) once the ranks report their step time, else the start-up bound."""
    return max(minimum_seconds, factor * step_seconds) if step_seconds else startup_seconds


def quiet_ranks(run_dir: Path, since: float, startup_seconds: float, factor: float) -> dict[int, tuple[dict, float]]:
    """Ranks whose heartbeat (written after ``since``) is older than :func:`hang_warning_seconds` while another
    rank's is fresh, each with its beat and that bound: what a hung rank looks like from outside. The step time
    is the slowest any rank reports (a stopped rank's own last beat may predate its first timed steps)."""
    beats = {}
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if beat["time"] >= since:
            beats[int(path.stem.split("-")[1])] = beat
    if not beats:
        return {}
    newest = max(beat["time"] for beat in beats.values())
    step_seconds = max((beat.get("step_seconds") or 0 for beat in beats.values()), default=0) or None
    bound = hang_warning_seconds(step_seconds, startup_seconds, factor)
    return {rank: (beat, bound) for rank, beat in beats.items() if newest - beat["time"] > bound}
