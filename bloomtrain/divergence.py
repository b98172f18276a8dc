"""What the loop does when a step's health checks (``health.StepHealth``) say training went wrong: count and
report a skipped NaN/Inf step, roll a loss spike back to the newest checkpoint, or stop diverged with
nothing saved after the last good state; and the exit status of a run that reached its last step.

Each function takes the running ``Trainer``, as ``selection.evaluate_if_due`` does (untyped: this layer sits
below the trainer), and reads or changes its progress, data position and engine.
"""

from __future__ import annotations

import logging

from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.health import EXIT_DIVERGED, Action, Verdict
from bloomtrain.parallel.engine import StepResult
from bloomtrain.progress import notify

logger = logging.getLogger(__name__)


def count_skipped(trainer, verdict: Verdict, result: StepResult) -> None:
    """A skipped step (weights and optimizer state untouched) counts in the progress and is said once."""
    if not verdict.skipped:
        return
    trainer.progress.nonfinite_steps += 1
    if verdict.action is not Action.DIVERGED and trainer.context.is_main:
        logger.warning("step %d skipped: loss %s, gradient norm %s (weights and optimizer state untouched; "
                       "the run stops after train.max_skipped_steps=%d such steps in a row)",
                       trainer.progress.step + 1, result.loss, result.grad_norm,
                       trainer.config.train.max_skipped_steps)


def what_diverged(trainer, verdict: Verdict) -> str:
    if verdict.action is Action.WEIGHTS_DIVERGED:
        return f"the weights became NaN/Inf at step {trainer.progress.step}"
    streak = trainer.health.non_finite
    return (f"the loss or gradients were NaN/Inf for {streak.in_a_row} steps in a row (steps {streak.first_step}-"
            f"{trainer.progress.step}, each skipped; train.max_skipped_steps={trainer.config.train.max_skipped_steps})")


def stop_diverged(trainer, what: str) -> int:
    """Stop without saving: the newest checkpoint is the last good state."""
    if trainer.context.is_main:
        latest = latest_checkpoint(trainer.checkpoints_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
        notify(f"training diverged: {what}; nothing saved after it, {kept}. Lower optimizer.lr (now "
               f"{trainer.config.optimizer.lr:g}) or check the data, then restart: it resumes from that checkpoint")
    trainer.record_stop("diverged", EXIT_DIVERGED)
    return EXIT_DIVERGED


def roll_back(trainer, verdict: Verdict) -> int | None:
    """Collective: load the newest checkpoint into the running engine and read on from the data position
    reached, passing over every sample read since that checkpoint. None to carry on, or EXIT_DIVERGED."""
    train, old = trainer.config.train, trainer.progress
    plan = trainer.checkpoints.plan_rollback()
    position = old.consumed_samples + old.skipped_samples
    spare = trainer.total_samples - trainer.run_samples
    skipped = position - plan.meta.progress.consumed_samples if plan else 0
    if plan is None or old.loss_spikes >= train.loss_spike_max_rollbacks or skipped > spare:
        reason = ("no checkpoint of this run under this layout to roll back to" if plan is None else
                  f"train.loss_spike_max_rollbacks={train.loss_spike_max_rollbacks} used up"
                  if old.loss_spikes >= train.loss_spike_max_rollbacks else
                  f"skipping {skipped} more samples would run past the data prepared for rollbacks")
        if trainer.context.is_main:
            notify(f"training diverged: {verdict.reason}; {reason}. Stopping with nothing saved after it; "
                   "lower optimizer.lr or check the data, then restart (checkpoint.resume=PATH for an older one)")
        trainer.record_stop("loss spike", EXIT_DIVERGED)
        return EXIT_DIVERGED
    passed_over = position - (plan.meta.progress.consumed_samples + plan.meta.progress.skipped_samples)
    with trainer.bounds.long_phase():
        restored = trainer.checkpoints.restore(plan, trainer.engine.engine, trainer.scheduler)
    restored.skipped_samples = position - restored.consumed_samples
    restored.loss_spikes = old.loss_spikes + 1
    restored.wandb_run_id, restored.nonfinite_steps = old.wandb_run_id, old.nonfinite_steps
    trainer.progress = restored
    trainer.batches.close()
    trainer.batches = trainer.batches_from(restored)
    trainer.heartbeat.step = restored.step
    if trainer.metrics is not None:
        trainer.metrics.rewind(restored.step)
        notify(f"{verdict.reason}; rolled back to {plan.checkpoint.name} and passed over the {passed_over} "
               f"samples read since (rollback {restored.loss_spikes} of {train.loss_spike_max_rollbacks})")
    return None


def end_of_run_status(trainer) -> int:
    """0 only for a run that ends with a usable checkpoint of healthy weights: not inside a streak of skipped
    steps (too short to have stopped it), not with a non-finite final validation, not after a failed last save."""
    streak, step = trainer.health.non_finite, trainer.progress.step
    if streak.in_a_row:
        return stop_diverged(trainer, f"the run ended inside a streak of {streak.in_a_row} NaN/Inf steps (steps "
                                      f"{streak.first_step}-{step}, each skipped)")
    if trainer.last_evaluation == (step, False):
        return stop_diverged(trainer, f"the validation loss after the last step ({step}) is NaN/Inf")
    if trainer.failed_save_step == step:
        if trainer.context.is_main:
            notify(f"the checkpoint of the last step ({step}) could not be saved (checkpoint.on_error=continue); "
                   f"the newest is {latest_checkpoint(trainer.checkpoints_dir)}. Free space, then restart to finish")
        return 1
    return 0
