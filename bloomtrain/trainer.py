"""The training loop: build everything from the config, resume if the run directory has a checkpoint,
then step until ``train.max_steps``, logging every step and checkpointing every ``checkpoint.interval``.

Building follows one order: the checkpoint manager decides what the run starts from (``plan_resume``),
the model is built for the layout from that plan (``parallel/parallelize.py``), then the optimizer, the
DeepSpeed engine and the LR schedule, and ``restore`` fills them and returns where training stands.

A fine-tuning run (``data.kind=finetune``) reads packed prompt/target rows instead of megatron-core's
datasets (``data/finetune.py``), weighs the loss to the global batch's targets, keeps the best checkpoint
by ``eval.metric`` and, at the end, scores the test split from it (``selection.py``).

Every rank runs this file; rank 0 alone writes the config, the metrics and the progress line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from megatron.core import parallel_state

from bloomtrain.build import DTYPES, build_engine
from bloomtrain.checkpoint import latest_checkpoint
from bloomtrain.checkpoint.manager import CheckpointManager
from bloomtrain.checkpoint.store import BEST, CheckpointSaveError, TrainingProgress, keep_as_best
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.blend import Blend
from bloomtrain.data.finetune import prepare_finetune_data, scale_loss_weights
from bloomtrain.data.loader import BatchLayout, build_train_dataset, load_tokenizer, step_batches
from bloomtrain.data.packing import FinetuneBlend
from bloomtrain.data.token_files import check_token_files
from bloomtrain.distributed import DistributedContext, set_collective_timeout
from bloomtrain.divergence import count_skipped, end_of_run_status, roll_back, stop_diverged, what_diverged
from bloomtrain.evaluation import build_pretraining_validation, build_target_validation, build_validation
from bloomtrain.flops import device_peak
from bloomtrain.harness.in_training import build_task_scores
from bloomtrain.health import Action, CollectiveBounds, Heartbeat, StepHealth, Verdict, is_finite
from bloomtrain.metrics import MetricsLogger, summary_rows
from bloomtrain.parallel.engine import StepResult
from bloomtrain.parallel.layout import ParallelLayout
from bloomtrain.plan import plan_table
from bloomtrain.preemption import EXIT_RESUMABLE, STOP_RECORD, StopRequests
from bloomtrain.progress import StepProgress, notify, print_summary
from bloomtrain.run_lock import RunLock
from bloomtrain.selection import BestMetric, TestSplit, evaluate_if_due
from bloomtrain.step_metrics import StepMeter

logger = logging.getLogger(__name__)


@dataclass
class Step:
    """One optimizer step's outcome and timings, as the loop passes it on."""

    result: StepResult
    batch: int
    elapsed: float
    data_wait: float
    param_norm: float | None


class Trainer:
    def __init__(self, config: BloomTrainConfig, context: DistributedContext, layout: ParallelLayout,
                 blend: Blend | FinetuneBlend) -> None:
        """``blend``: pretraining text, or a fine-tuning blend (packed prompt/target rows, loss on targets)."""
        self.config, self.context, self.layout, self.blend = config, context, layout, blend
        train = config.train
        self.stops = StopRequests(train.exit_duration_minutes)
        self.activity = "starting"  # what this rank is doing, for the message when a peer fails
        self.run_dir = Path(config.run.dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.heartbeat = Heartbeat(self.run_dir, context.rank)
        self.bounds = CollectiveBounds(config.distributed.timeout_minutes * 60, config.distributed.step_timeout_factor,
                                       config.distributed.min_step_timeout_seconds, set_collective_timeout)
        self.stop_reason: str | None = None  # agreed by every rank, in the loop or inside an evaluation
        self.run_lock: RunLock | None = None  # rank 0's hold on the run directory, given back by close()
        self.last_evaluation: tuple[int, bool] | None = None  # (step, whether its loss was finite)
        self.new_best = False  # this step's evaluation gave a new best eval.metric: save it as checkpoints/best
        self.failed_save_step: int | None = None
        self.health = StepHealth(train.max_skipped_steps, train.precision == "fp16", train.loss_spike_factor,
                                 train.loss_spike_window, train.inject_loss_spike_at, train.inject_nonfinite_at)
        self.best = BestMetric(config.eval, isinstance(blend, FinetuneBlend) or config.eval.metric != "loss",
                               context.device)
        # Fine-tuning data first: with train.epochs it decides train.max_steps, which the config records.
        self.finetune = prepare_finetune_data(blend, config, context.is_main) if isinstance(blend, FinetuneBlend) \
            else None
        self._write_config()
        self.tokenizer = self._check_data()
        self._build_and_restore()
        self._build_data()
        self.metrics: MetricsLogger | None = None
        if context.is_main:
            self._start_logging()

    # ------------------------------------------------------------------------------------------ set-up

    def _write_config(self) -> None:
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.config))

    def _check_data(self):
        """The token files fit the run, and the tokenizer fits the model; returns the tokenizer."""
        config, train = self.config, self.config.train
        if self.finetune is not None:
            from bloomtrain.data.tokenizer import TokenEncoder

            tokenizer = TokenEncoder(self.blend.tokenizer)
        else:
            check_token_files(self.blend, train.seq_length, train.max_steps * train.global_batch_size,
                              config.eval.iters * train.global_batch_size if config.eval.interval else 0)
            tokenizer = load_tokenizer(self.blend.tokenizer)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                f"{config.model.vocab_size}; set model.vocab_size>={tokenizer.vocab_size}")
        return tokenizer

    def _build_and_restore(self) -> None:
        """What the run starts from decides the model; then the engine, and where training stands."""
        config = self.config
        self.checkpoints = CheckpointManager(config.checkpoint, self.run_dir, self.layout, config.model,
                                             self.blend.tokenizer, run_config_yaml=to_yaml(config))
        resume = self.checkpoints.plan_resume()
        self.engine, self.scheduler = build_engine(config, self.layout, self.context.device, resume)
        self.progress = self.checkpoints.restore(resume, self.engine.engine, self.scheduler)

    def _build_data(self) -> None:
        config, train = self.config, self.config.train
        self.batch_layout = BatchLayout(train.micro_batch_size, train.global_batch_size, self.layout.data,
                                        parallel_state.get_data_parallel_rank(),
                                        tuple(train.rampup_batch_size) if train.rampup_batch_size else None)
        self.run_samples = self.batch_layout.samples_for(train.max_steps)
        # Room for the samples loss-spike rollbacks pass over (at most a checkpoint interval each).
        spare_steps = train.loss_spike_max_rollbacks * config.checkpoint.interval if train.loss_spike_factor else 0
        self.total_samples = self.run_samples + spare_steps * train.global_batch_size
        self.pretraining_validation = None
        if self.finetune is not None:
            self.dataset = self.finetune.train
            self.total_samples = len(self.dataset)  # rollbacks pass over rows the epochs already hold
            self.validation = build_target_validation(self.finetune.valid, config.eval, self.batch_layout)
            self.pretraining_validation = build_pretraining_validation(
                config.eval.pretraining_blend, train, config.eval, self.batch_layout, self.run_dir / "data_index")
        else:
            if self.context.is_main:  # minutes for a large blend on the first start; cached for the next
                logger.info("indexing the training data (the blended dataset's index, cached in %s)",
                            self.run_dir / "data_index")
            self.dataset = build_train_dataset(self.blend, self.tokenizer, train.seq_length, self.total_samples,
                                               train.seed, self.run_dir / "data_index")
            self.validation = build_validation(self.blend, self.tokenizer, train, config.eval, self.batch_layout,
                                               self.run_dir / "data_index", self.context.is_main)
        self.batches = self.batches_from(self.progress)
        self.task_scores = build_task_scores(config, self.engine, self.blend, self.layout.sequence_parallel)
        self.test_split = TestSplit(self) if self.finetune is not None else None

    def _start_logging(self) -> None:
        """Rank 0: the plan, MFU's peak, then the metrics sinks. The peak is measured before W&B starts its
        service process, which would compete for the cores; each rank's peak is measured with the threads
        it has (on CPU the launcher splits the cores between ranks), and MFU divides the per-device FLOP/s
        by it, as on GPUs."""
        config, train = self.config, self.config.train
        logger.info("the plan, sized for launch.gpu=%s (docs/planning.md):\n%s", config.launch.gpu,
                    plan_table(config, self.layout.data))
        if not train.peak_tflops:
            logger.info("measuring this device's peak FLOP/s for MFU (seconds; train.peak_tflops skips it)")
        peak = device_peak(self.context.device, DTYPES[train.precision], train.peak_tflops)
        logger.info("MFU's peak: %s", peak.source)
        fine_tuning = self.finetune is not None
        self.meter = StepMeter(config.model, train, config.parallel.activation_checkpointing, peak,
                               self.context.world_size, None if fine_tuning else self.blend, self.dataset,
                               {"packing_efficiency": self.finetune.train.efficiency()} if fine_tuning else None)
        self.metrics = MetricsLogger(self.run_dir, config.logging, config.run.name, dataclasses.asdict(config),
                                     self.progress.step, self.progress.wandb_run_id)
        self.progress.wandb_run_id = self.metrics.wandb_run_id
        self.wandb_files = Path(self.metrics.wandb_dir).parent if self.metrics.wandb_dir else None

    # ------------------------------------------------------------------------------------------- loop

    def train(self) -> int:
        """Train to ``train.max_steps``; returns the process exit status (0; EXIT_RESUMABLE after a stop;
        EXIT_DIVERGED after ``train.max_skipped_steps`` non-finite steps in a row, or a spike with no
        rollback left)."""
        status: int | None = None
        if self.test_split is not None:
            self.test_split.score_start()
        display = StepProgress(self.config.train.max_steps, self.progress.step, self.config.logging.interval,
                               enabled=self.context.is_main)
        with display:
            while status is None and self.progress.step < self.config.train.max_steps:
                step = self.train_step()
                verdict = self.health.judge(self.progress.step + 1, step.result.loss, step.result.grad_norm,
                                            step.param_norm)
                count_skipped(self, verdict, step.result)
                self._log_step(step, display)
                self.bounds.record(step.elapsed)
                self.heartbeat.step, self.heartbeat.step_seconds = self.progress.step, self.bounds.median_step
                if verdict.action in (Action.DIVERGED, Action.WEIGHTS_DIVERGED):
                    status = stop_diverged(self, what_diverged(self, verdict))
                elif verdict.action is Action.ROLL_BACK:
                    status = roll_back(self, verdict)
                else:
                    self.new_best, stop_early = evaluate_if_due(self)
                    status = self._checkpoint_and_decide_exit(verdict, stop_early)
        if status is None:
            status = end_of_run_status(self)
        if status == 0 and self.test_split is not None:
            self.test_split.score_best()
        self.stops.restore()
        if self.metrics is not None:
            self.metrics.close()
            self._print_summary()
        return status

    def train_step(self) -> Step:
        """One optimizer step over the next global batch (collective: every rank)."""
        started = time.perf_counter()
        self.activity = "in the training step"
        batch = self.batch_layout.batch_at(self.progress.consumed_samples)
        if batch != self.engine.engine.train_batch_size():  # a ramp-up step: fewer micro-batches
            self.engine.engine.set_train_batch_size(batch)
        self.scheduler.step(batch)  # the schedule counts samples: step k trains with lr(k)
        micro_batches = next(self.batches)
        if self.finetune is not None:  # the loss is the mean over the whole global batch's targets
            position = self.progress.consumed_samples + self.progress.skipped_samples
            scale_loss_weights(micro_batches, self.dataset.denominator(position, batch), self.layout.data)
        data_wait = time.perf_counter() - started
        result = self.engine.train_step(micro_batches)
        elapsed = time.perf_counter() - started
        return Step(result, batch, elapsed, data_wait, self.engine.parameter_norm())

    def _checkpoint_and_decide_exit(self, verdict: Verdict, stop_early: bool) -> int | None:
        """Save when due (never right after a skipped step: the newest checkpoint stays the last one before
        it) or when stopping; then agree with every rank on a stop request. The exit status, or None."""
        progress, train, interval = self.progress, self.config.train, self.config.checkpoint.interval
        stop_early = stop_early and progress.step < train.max_steps  # the last step saves anyway
        due = progress.step == train.max_steps or bool(interval and progress.step % interval == 0)
        new_best, self.new_best = self.new_best, False
        if (due or new_best) and verdict.skipped:
            due = new_best = False
            if self.context.is_main:
                logger.warning("step %d: no checkpoint after a NaN/Inf step", progress.step)
        if due or stop_early or new_best:
            self.activity = "saving a checkpoint"
            saved = self.save()
            if new_best and saved is not None and self.context.is_main:
                keep_as_best(saved)
                logger.info("%s is the best so far (eval.metric=%s %s): kept as %s", saved.name, self.best.name,
                            self.best.shown(progress.best_valid_loss), saved.parent / BEST)
            due = due or new_best
        if stop_early:
            if self.context.is_main:
                notify(f"stopped early after step {progress.step}: eval.metric={self.best.name} has not improved on "
                       f"{self.best.shown(progress.best_valid_loss)} (step {progress.best_step}) for "
                       f"{self.config.eval.early_stop_patience} evaluations (eval.early_stop_patience); "
                       "checkpoint saved")
            return 0
        if self.stop_reason is None and progress.step < train.max_steps:  # unless agreed during the evaluation
            self._stop_agreed()
        reason = self.stop_reason
        if reason is None or progress.step >= train.max_steps:
            return None
        if not due:
            self.save()
        self.record_stop(reason, EXIT_RESUMABLE)
        if self.context.is_main:
            notify(f"stopped after step {progress.step} ({reason}); checkpoint saved, "
                   f"exiting with status {EXIT_RESUMABLE} so the job can be requeued")
        return EXIT_RESUMABLE

    def _stop_agreed(self) -> bool:
        """Collective: whether every rank stops now (a signal or the time budget on any of them)."""
        activity, self.activity = self.activity, "agreeing on whether to stop"
        self.stop_reason = self.stops.agreed_reason(self.context.device)
        self.activity = activity
        return self.stop_reason is not None

    def record_stop(self, reason: str, status: int) -> None:
        """``RUN_DIR/stopped.json``: why and how the run stopped, for the launcher and job scripts."""
        if self.context.is_main:
            record = {"step": self.progress.step, "reason": reason, "exit_status": status}
            (self.run_dir / STOP_RECORD).write_text(json.dumps(record) + "\n")

    def _log_step(self, step: Step, display: StepProgress) -> None:
        progress, train, result = self.progress, self.config.train, step.result
        if self.metrics is not None:
            step_tokens = self.meter.tokens_by_language(progress.consumed_samples + progress.skipped_samples,
                                                        step.batch)
            for language, count in step_tokens.items():
                progress.tokens_by_language[language] = progress.tokens_by_language.get(language, 0) + count
        progress.step += 1
        progress.consumed_samples += step.batch
        progress.consumed_tokens += step.batch * train.seq_length
        if self.metrics is None:
            return
        metrics = self.meter.metrics(
            loss=result.loss, lr=self.engine.optimizer.param_groups[0]["lr"],
            grad_norm=result.grad_norm if is_finite(result.grad_norm) else None,
            param_norm=step.param_norm, loss_scale=self.engine.loss_scale(),
            skipped_steps=self.engine.skipped_steps(), nonfinite_steps=progress.nonfinite_steps,
            batch_size=step.batch, elapsed=step.elapsed, data_wait=step.data_wait, optimizer_s=result.optimizer_s,
            consumed_samples=progress.consumed_samples, consumed_tokens=progress.consumed_tokens,
            tokens_by_language=progress.tokens_by_language, device=self.context.device)
        self.metrics.log(metrics, progress.step)
        display.update(progress.step, metrics)

    def batches_from(self, progress: TrainingProgress):
        return step_batches(self.dataset, self.batch_layout, progress.consumed_samples, self.run_samples,
                            self.config.data.num_workers, offset=progress.skipped_samples)

    def close(self) -> None:
        """End the data loader's workers and the heartbeat, give back the run directory; safe to call more
        than once."""
        self.heartbeat.stop()
        self.batches.close()
        if self.run_lock is not None:
            self.run_lock.release()

    def save(self) -> Path | None:
        """Collective; None when the save failed and ``checkpoint.on_error=continue``."""
        try:
            with self.bounds.long_phase():
                return self.checkpoints.save(self.engine.engine, self.scheduler, self.progress)
        except CheckpointSaveError as error:
            if self.config.checkpoint.on_error != "continue":
                raise
            if self.context.is_main:
                notify(f"{error}; training goes on (checkpoint.on_error=continue) and saves again "
                       "at the next interval")
            self.failed_save_step = self.progress.step
            return None

    def _print_summary(self) -> None:
        latest = latest_checkpoint(self.checkpoints_dir)
        print_summary(summary_rows(self.run_dir, latest, self.wandb_files, self.config.logging.tensorboard))
