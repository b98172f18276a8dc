"""The training loop: build everything from the config, resume if the run directory has a checkpoint,
then step until ``train.max_steps``, logging every step and checkpointing every ``checkpoint.interval``.

Building follows one order: the checkpoint manager decides what the run starts from (``plan_resume``),
the model is built for the layout from that plan (``parallel/parallelize.py``), then the optimizer, the
DeepSpeed engine and the LR schedule, and ``restore`` fills them and returns where training stands.

Every rank runs this file; rank 0 alone writes the config, the metrics and the progress line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.checkpoint.manager import CheckpointManager, ResumePlan
from bloomtrain.checkpoint.store import CheckpointSaveError, TrainingProgress
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.blend import Blend
from bloomtrain.data.loader import (
    BatchLayout,
    build_train_dataset,
    build_validation_datasets,
    load_tokenizer,
    step_batches,
)
from bloomtrain.data.token_files import check_token_files
from bloomtrain.distributed import DistributedContext
from bloomtrain.evaluation import Validation
from bloomtrain.flops import device_peak
from bloomtrain.health import EXIT_DIVERGED, Heartbeat, LossSpikes, NonFiniteSteps, is_finite
from bloomtrain.metrics import EVAL_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, read_metrics
from bloomtrain.model.bloom import BloomBlock
from bloomtrain.optim import build_optimizer, build_scheduler
from bloomtrain.parallel.engine import StepResult, TrainingEngine
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.parallel.parallelize import build_parallel_model
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, StopRequests
from bloomtrain.progress import StepProgress, notify, print_summary
from bloomtrain.step_metrics import StepMeter

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(config: BloomTrainConfig, layout: ParallelLayout, device: torch.device,
                 resume: ResumePlan) -> tuple[TrainingEngine, OptimizerParamScheduler]:
    """This rank's model for the layout, its optimizer, the DeepSpeed engine and the LR schedule, shaped
    by what the run resumes from (padded vocabulary, initial weights, a universal checkpoint)."""
    model = build_parallel_model(config.model, layout, device, config.train.seed, resume.padded_vocab_size,
                                 config.parallel.activation_checkpointing, resume.initial_weights())
    if config.train.compile:  # every block, wherever the layout put it (pipeline stages wrap them)
        for block in [module for module in model.modules() if isinstance(module, BloomBlock)]:
            block.compile()
    optimizer = build_optimizer(model, config.optimizer, config.train.precision, layout.zero_stage)
    engine = TrainingEngine(model, optimizer, config.train, config.optimizer.grad_clip, layout, resume.universal)
    return engine, build_scheduler(engine.optimizer, config.optimizer, config.train.max_steps,
                                   config.train.global_batch_size)


class Trainer:
    def __init__(self, config: BloomTrainConfig, context: DistributedContext, layout: ParallelLayout,
                 blend: Blend) -> None:
        self.config, self.context, self.layout, self.blend = config, context, layout, blend
        train = config.train
        self.stops = StopRequests(train.exit_duration_minutes)
        self.activity = "starting"  # what this rank is doing, for the message when a peer fails
        self.injected: set[int] = set()  # steps whose loss train.inject_loss_spike_at has multiplied
        self.run_dir = Path(config.run.dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.heartbeat = Heartbeat(self.run_dir, context.rank)
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(config))

        check_token_files(blend, train.seq_length, train.max_steps * train.global_batch_size,
                          config.eval.iters * train.global_batch_size if config.eval.interval else 0)
        self.tokenizer = load_tokenizer(blend.tokenizer)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{config.model.vocab_size}; set model.vocab_size>={self.tokenizer.vocab_size}")

        self.checkpoints = CheckpointManager(config.checkpoint, self.run_dir, layout, config.model, blend.tokenizer,
                                             run_config_yaml=to_yaml(config))
        resume = self.checkpoints.plan_resume()
        self.engine, self.scheduler = build_engine(config, layout, context.device, resume)
        self.progress = self.checkpoints.restore(resume, self.engine.engine, self.scheduler)

        self.batch_layout = BatchLayout(train.micro_batch_size, train.global_batch_size, layout.data,
                                        parallel_state.get_data_parallel_rank(),
                                        tuple(train.rampup_batch_size) if train.rampup_batch_size else None)
        self.run_samples = self.batch_layout.samples_for(train.max_steps)
        # Room for the samples loss-spike rollbacks pass over (at most a checkpoint interval each).
        spare_steps = train.loss_spike_max_rollbacks * config.checkpoint.interval if train.loss_spike_factor else 0
        self.total_samples = self.run_samples + spare_steps * train.global_batch_size
        self.dataset = build_train_dataset(blend, self.tokenizer, train.seq_length, self.total_samples,
                                           train.seed, self.run_dir / "data_index")
        self.batches = self._batches_from(self.progress)
        self.validation = self._build_validation()
        self.metrics: MetricsLogger | None = None
        if context.is_main:
            # Measured before W&B starts its service process, which would compete for the cores. Each
            # rank's peak is measured with the threads it has (on CPU the launcher splits the cores
            # between ranks); MFU divides the per-device FLOP/s by it, as on GPUs.
            self._log_plan()
            peak = device_peak(context.device, DTYPES[train.precision], train.peak_tflops)
            logger.info("MFU's peak: %s", peak.source)
            self.meter = StepMeter(config.model, train, config.parallel.activation_checkpointing, peak,
                                   context.world_size, blend, self.dataset)
            self.metrics = MetricsLogger(self.run_dir, config.logging, config.run.name,
                                         dataclasses.asdict(config), self.progress.step, self.progress.wandb_run_id)
            self.progress.wandb_run_id = self.metrics.wandb_run_id
            self.wandb_files = Path(self.metrics.wandb_dir).parent if self.metrics.wandb_dir else None

    def train(self) -> int:
        """Train to ``train.max_steps``; returns the process exit status (0; EXIT_RESUMABLE after a stop;
        EXIT_DIVERGED after ``train.max_skipped_steps`` non-finite steps in a row)."""
        train = self.config.train
        status = 0
        progress = self.progress
        non_finite = NonFiniteSteps(train.max_skipped_steps)
        spikes = LossSpikes(train.loss_spike_factor, train.loss_spike_window) if train.loss_spike_factor else None
        loss_scaling = train.precision == "fp16"
        display = StepProgress(train.max_steps, progress.step, self.config.logging.interval,
                               enabled=self.context.is_main)
        with display:
            while progress.step < train.max_steps:
                started = time.perf_counter()
                self.activity = "in the training step"
                batch = self.batch_layout.batch_at(progress.consumed_samples)
                if batch != self.engine.engine.train_batch_size():  # a ramp-up step: fewer micro-batches
                    self.engine.engine.set_train_batch_size(batch)
                self.scheduler.step(batch)  # the schedule counts samples: step k trains with lr(k)
                micro_batches = next(self.batches)
                data_wait = time.perf_counter() - started
                result = self.engine.train_step(micro_batches)
                elapsed = time.perf_counter() - started
                param_norm = self.engine.parameter_norm()  # collective: every rank
                diverged = non_finite.record(progress.step + 1, result.loss, result.grad_norm, loss_scaling)
                if non_finite.last_step_was_bad:
                    progress.nonfinite_steps += 1
                    if not diverged:
                        self._note_skipped_step(result)
                self._log_step(result, batch, elapsed, data_wait, param_norm, display)
                if diverged:
                    status = self._stop_diverged(non_finite)
                    break
                self.heartbeat.step = progress.step
                if param_norm is not None and not is_finite(param_norm):
                    status = self._stop_diverged(non_finite, weights=True)
                    break
                seen = result.loss
                if progress.step in train.inject_loss_spike_at and progress.step not in self.injected:
                    self.injected.add(progress.step)  # once: the re-done step after a rollback is clean
                    seen *= 1000
                if spikes is not None and math.isfinite(seen) and spikes.is_spike(seen):
                    status = self._roll_back(seen, spikes)
                    if status is not None:
                        break
                    progress = self.progress
                    continue
                patience_exhausted = self._evaluate_if_due() and progress.step < train.max_steps
                interval = self.config.checkpoint.interval
                saved = progress.step == train.max_steps or bool(interval and progress.step % interval == 0)
                if saved and non_finite.last_step_was_bad:
                    # The newest checkpoint stays the last one before the streak (saving resumes with it).
                    saved = False
                    if self.context.is_main:
                        logger.warning("step %d: no checkpoint after a NaN/Inf step", progress.step)
                if saved or patience_exhausted:
                    self.activity = "saving a checkpoint"
                    self.save()
                if patience_exhausted:
                    if self.context.is_main:
                        notify(f"stopped early after step {progress.step}: validation loss has not improved on "
                               f"{progress.best_valid_loss:.4f} for {self.config.eval.early_stop_patience} "
                               "evaluations (eval.early_stop_patience); checkpoint saved")
                    break
                self.activity = "agreeing on whether to stop"
                reason = self.stops.agreed_reason(self.context.device)
                if reason is not None and progress.step < train.max_steps:
                    if not saved:
                        self.save()
                    if self.context.is_main:
                        record = {"step": progress.step, "reason": reason, "exit_status": EXIT_RESUMABLE}
                        (self.run_dir / STOP_RECORD).write_text(json.dumps(record) + "\n")
                        notify(f"stopped after step {progress.step} ({reason}); checkpoint saved, "
                               f"exiting with status {EXIT_RESUMABLE} so the job can be requeued")
                    status = EXIT_RESUMABLE
                    break
        self.stops.restore()
        if self.metrics is not None:
            self.metrics.close()
            self._print_summary()
        return status

    def _log_plan(self) -> None:
        from bloomtrain.plan import layout_of, plan_of

        try:
            table = plan_of(self.config, layout_of(self.config, self.layout.data)).table()
        except ConfigError as error:
            logger.warning("no plan: %s", error)
            return
        logger.info("the plan, sized for launch.gpu=%s (docs/planning.md):\n%s", self.config.launch.gpu, table)

    def _roll_back(self, loss: float, spikes: LossSpikes) -> int | None:
        """Collective: load the newest checkpoint into the running engine and read on from the data position
        reached, passing over every sample read since that checkpoint. None to carry on, or EXIT_DIVERGED."""
        train, old = self.config.train, self.progress
        plan = self.checkpoints.plan_rollback()
        position = old.consumed_samples + old.skipped_samples
        spare = self.total_samples - self.run_samples
        skipped = position - plan.meta.progress.consumed_samples if plan else 0
        why = (f"loss spike at step {old.step}: loss {loss:.4f} > {spikes.factor:g} x {max(spikes.recent):.4f} "
               f"(the highest of the last {len(spikes.recent)} steps, train.loss_spike_factor)")
        if plan is None or old.loss_spikes >= train.loss_spike_max_rollbacks or skipped > spare:
            reason = ("no checkpoint of this run under this layout to roll back to" if plan is None else
                      f"train.loss_spike_max_rollbacks={train.loss_spike_max_rollbacks} used up"
                      if old.loss_spikes >= train.loss_spike_max_rollbacks else
                      f"skipping {skipped} more samples would run past the data prepared for rollbacks")
            if self.context.is_main:
                notify(f"training diverged: {why}; {reason}. Stopping with nothing saved after it; lower "
                       "optimizer.lr or check the data, then restart (checkpoint.resume=PATH for an older one)")
                (self.run_dir / STOP_RECORD).write_text(json.dumps(
                    {"step": old.step, "reason": "loss spike", "exit_status": EXIT_DIVERGED}) + "\n")
            return EXIT_DIVERGED
        passed_over = position - (plan.meta.progress.consumed_samples + plan.meta.progress.skipped_samples)
        restored = self.checkpoints.restore(plan, self.engine.engine, self.scheduler)
        restored.skipped_samples = position - restored.consumed_samples
        restored.loss_spikes = old.loss_spikes + 1
        restored.wandb_run_id, restored.nonfinite_steps = old.wandb_run_id, old.nonfinite_steps
        self.progress = restored
        self.batches.close()
        self.batches = self._batches_from(restored)
        self.heartbeat.step = restored.step
        if self.metrics is not None:
            self.metrics.rewind(restored.step)
            notify(f"{why}; rolled back to {plan.checkpoint.name} and passed over the {passed_over} samples "
                   f"read since (rollback {restored.loss_spikes} of {train.loss_spike_max_rollbacks})")
        return None

    def _note_skipped_step(self, result: StepResult) -> None:
        if self.context.is_main:
            logger.warning("step %d skipped: loss %s, gradient norm %s (weights and optimizer state untouched; "
                           "the run stops after train.max_skipped_steps=%d such steps in a row)",
                           self.progress.step + 1, result.loss, result.grad_norm, self.config.train.max_skipped_steps)

    def _stop_diverged(self, non_finite: NonFiniteSteps, weights: bool = False) -> int:
        """Stop without saving: the newest checkpoint is the last good state."""
        if self.context.is_main:
            latest = latest_checkpoint(self.checkpoints_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
            if weights:
                what = f"the weights became NaN/Inf at step {self.progress.step}"
            else:
                what = (f"the loss or gradients were NaN/Inf for {non_finite.in_a_row} steps in a row (steps "
                        f"{non_finite.first_step}-{self.progress.step}, each skipped; train.max_skipped_steps="
                        f"{self.config.train.max_skipped_steps})")
            notify(f"training diverged: {what}; nothing saved after it, {kept}. Lower optimizer.lr (now "
                   f"{self.config.optimizer.lr:g}) or check the data, then restart: it resumes from that checkpoint")
            record = {"step": self.progress.step, "reason": "diverged", "exit_status": EXIT_DIVERGED}
            (self.run_dir / STOP_RECORD).write_text(json.dumps(record) + "\n")
        return EXIT_DIVERGED

    def _log_step(self, result: StepResult, batch: int, elapsed: float, data_wait: float, param_norm: float | None,
                  display: StepProgress) -> None:
        progress, train = self.progress, self.config.train
        if self.metrics is not None:
            step_tokens = self.meter.tokens_by_language(progress.consumed_samples + progress.skipped_samples, batch)
            for language, count in step_tokens.items():
                progress.tokens_by_language[language] = progress.tokens_by_language.get(language, 0) + count
        progress.step += 1
        progress.consumed_samples += batch
        progress.consumed_tokens += batch * train.seq_length
        if self.metrics is None:
            return
        metrics = self.meter.metrics(
            loss=result.loss, lr=self.engine.optimizer.param_groups[0]["lr"],
            grad_norm=result.grad_norm if is_finite(result.grad_norm) else None,
            param_norm=param_norm, loss_scale=self.engine.loss_scale(), skipped_steps=self.engine.skipped_steps(),
            nonfinite_steps=progress.nonfinite_steps, batch_size=batch, elapsed=elapsed, data_wait=data_wait,
            optimizer_s=result.optimizer_s,
            consumed_samples=progress.consumed_samples, consumed_tokens=progress.consumed_tokens,
            tokens_by_language=progress.tokens_by_language, device=self.context.device)
        self.metrics.log(metrics, progress.step)
        display.update(progress.step, metrics)

    def _build_validation(self) -> Validation | None:
        config, train = self.config, self.config.train
        if not config.eval.interval:
            return None
        if not self.blend.validation_sets:
            if self.context.is_main:
                logger.warning("eval.interval=%d but data.blend lists no validation sets (valid_prefix): no "
                               "evaluation; the data pipeline writes them (split.valid_fraction)", config.eval.interval)
            return None
        datasets = build_validation_datasets(self.blend, self.tokenizer, train.seq_length,
                                             config.eval.iters * train.global_batch_size, train.seed,
                                             self.run_dir / "data_index")
        full_batches = dataclasses.replace(self.batch_layout, rampup=None)  # evaluation ignores the ramp-up
        return Validation(datasets, full_batches, config.eval.iters, train.seq_length)

    def _evaluate_if_due(self) -> bool:
        """Evaluate every ``eval.interval`` steps and after the last; True once early stopping's patience is
        used up. Every rank sees the same losses (they are reduced over the data-parallel group)."""
        step, eval_config = self.progress.step, self.config.eval
        if self.validation is None or (step % eval_config.interval and step != self.config.train.max_steps):
            return False
        self.activity = "evaluating"
        evaluation = self.validation.run(self.engine.evaluate_step)
        if self.metrics is not None:
            self.metrics.log_eval(evaluation, step)
            notify(f"validation at step {step}: loss {evaluation['loss']:.4f}, perplexity "
                   f"{evaluation['perplexity']:.2f} over {len(evaluation['languages'])} languages")
        progress = self.progress
        if progress.best_valid_loss is None or evaluation["loss"] < progress.best_valid_loss:
            progress.best_valid_loss, progress.evals_without_improvement = evaluation["loss"], 0
        else:
            progress.evals_without_improvement += 1
        patience = eval_config.early_stop_patience
        return bool(patience) and progress.evals_without_improvement >= patience

    def _batches_from(self, progress: TrainingProgress):
        return step_batches(self.dataset, self.batch_layout, progress.consumed_samples, self.run_samples,
                            self.config.data.num_workers, offset=progress.skipped_samples)

    def close(self) -> None:
        """End the data loader's workers and the heartbeat; safe to call more than once."""
        self.heartbeat.stop()
        self.batches.close()

    def save(self) -> Path | None:
        """Collective; None when the save failed and ``checkpoint.on_error=continue``."""
        try:
            return self.checkpoints.save(self.engine.engine, self.scheduler, self.progress)
        except CheckpointSaveError as error:
            if self.config.checkpoint.on_error != "continue":
                raise
            if self.context.is_main:
                notify(f"bloomtrain: {error}; training goes on (checkpoint.on_error=continue) and saves again "
                       "at the next interval")
            return None

    def _print_summary(self) -> None:
        latest = latest_checkpoint(self.checkpoints_dir)
        rows = {
            "run directory": str(self.run_dir.resolve()),
            "metrics": str((self.run_dir / METRICS_FILE).resolve()),
            "checkpoint": str(latest.resolve()) if latest else "(none)",
            "W&B files": str(self.wandb_files or "(W&B disabled)"),
        }
        if self.config.logging.tensorboard:
            rows["TensorBoard"] = f"tensorboard --logdir {(self.run_dir / TENSORBOARD_DIR).resolve()}"
        evaluations = read_metrics(self.run_dir, EVAL_FILE)
        if evaluations:
            first, last = evaluations[0], evaluations[-1]
            rows["validation"] = (f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
                                  f"(step {last['step']}), {(self.run_dir / EVAL_FILE).resolve()}")
            for language, values in last["languages"].items():
                before = first["languages"].get(language, {}).get("loss", float("nan"))
                rows[f"  valid {language}"] = f"loss {before:.3f} -> {values['loss']:.3f}"
        print_summary(rows)

