"""Which checkpoint is best, when to stop early, and the test split scored once from the best checkpoint.

``eval.metric`` names what "best" means: ``loss`` (the validation loss: on a fine-tuning run, the mean
target-token loss over every task's validation rows; lower is better) or ``TASK/METRIC``, a score of
``eval.tasks`` as logged under ``tasks/`` (better as the task declares: lm-eval's ``higher_is_better``).
Task scores are held by global rank 0 alone, so the value is broadcast: every rank takes the same
decisions (save, stop). A fine-tuning run, or any run naming a task metric, keeps ``checkpoints/best``:
the checkpoint of the step with the best value, saved at that step (a hard-linked copy that pruning
does not touch).

At the end of a fine-tuning run the best checkpoint is loaded into the running engine and the test split
scored once: each task's target loss on its test rows and ``eval.tasks`` on their test split, written to
``RUN_DIR/test.json`` beside ``test_start.json`` (the same scores of the starting weights, taken before
the first step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bloomtrain.config import ConfigError, EvalConfig

TEST_FILE = "test.json"
TEST_START_FILE = "test_start.json"


class BestMetric:
    """``eval.metric``'s value at each evaluation, the best so far (in the run's progress, so a resume
    keeps it) and early stopping's patience."""

    def __init__(self, eval_config: EvalConfig, keeps_best: bool, device: torch.device) -> None:
        self.name, self.patience, self.keeps_best, self.device = eval_config.metric, eval_config.early_stop_patience, \
            keeps_best, device
        self.higher = True  # a task metric's direction, as its task declares (known once scored)

    def value(self, evaluation: dict[str, Any] | None, scores: dict[str, float] | None,
              higher_is_better: dict[str, bool]) -> float | None:
        """Collective: the metric at this evaluation, the same on every rank; None when it was not measured
        now (a task metric between task scorings, a validation interrupted by a stop)."""
        if self.name == "loss":
            return None if evaluation is None else float(evaluation["loss"])
        if scores is None:
            return None
        known = torch.tensor([math.nan], dtype=torch.float64, device=self.device)
        if dist.get_rank() == 0:
            if self.name not in scores:
                known.fill_(math.inf)  # said below on every rank, so they all stop the same way
            else:
                known.fill_(scores[self.name])
        dist.broadcast(known, src=0)
        if math.isinf(known.item()):
            raise ConfigError(f"eval.metric={self.name} is not among the task scores of eval.tasks"
                              + (f" ({', '.join(sorted(scores))})" if scores else "")
                              + "; name one as TASK/METRIC, e.g. " + (next(iter(sorted(scores)), "nusax_sentiment/f1")))
        higher = higher_is_better.get(self.name, True) if dist.get_rank() == 0 else True
        direction = torch.tensor([1.0 if higher else -1.0], device=self.device)
        dist.broadcast(direction, src=0)
        self.higher = direction.item() > 0
        return -known.item() if self.higher else known.item()  # stored lower-is-better

    def update(self, progress, step: int, value: float | None) -> tuple[bool, bool]:
        """(is a new best, patience used up). ``value`` is lower-is-better (see :meth:`value`)."""
        if value is None:
            return False, False
        improved = progress.best_valid_loss is None or value < progress.best_valid_loss
        if improved:
            progress.best_valid_loss, progress.best_step, progress.evals_without_improvement = value, step, 0
        else:
            progress.evals_without_improvement += 1
        return improved and self.keeps_best, bool(self.patience) and progress.evals_without_improvement >= self.patience

    def as_read(self, stored: float | None) -> float | None:
        """The stored (lower-is-better) value as the metric reads."""
        if stored is None or self.name == "loss":
            return stored
        return -stored if self.higher else stored

    def shown(self, stored: float | None) -> str:
        value = self.as_read(stored)
        return "none" if value is None else f"{value:.4f}"


def evaluate_if_due(trainer) -> tuple[bool, bool]:
    """Collective: validation every ``eval.interval`` steps and after the last, task scores when due, and
    what they mean for ``eval.metric``: (a new best to keep, early stopping's patience used up). Every rank
    sees the same losses (reduced over the data-parallel group) and the same metric (broadcast)."""
    from bloomtrain.data.finetune import rows_loss
    from bloomtrain.health import is_finite
    from bloomtrain.progress import notify

    step, eval_config, last = trainer.progress.step, trainer.config.eval, trainer.config.train.max_steps
    tasks = trainer.task_scores
    scores = tasks.run_if_due(step, last, trainer) if tasks is not None else None
    higher_is_better = tasks.higher_is_better if tasks is not None else {}
    if trainer.validation is None or (step % eval_config.interval and step != last):
        if scores and trainer.metrics is not None:
            trainer.metrics.log_eval(None, step, scores)
        return trainer.best.update(trainer.progress, step, trainer.best.value(None, scores, higher_is_better))
    trainer.activity = "evaluating"
    engine = trainer.engine
    with trainer.bounds.long_phase():
        evaluation = trainer.validation.run(engine.evaluate_step, trainer._stop_agreed)
        if evaluation is not None and trainer.pretraining_validation is not None:
            evaluation["pretraining"] = trainer.pretraining_validation.run(
                rows_loss(engine.evaluate_step, trainer.layout.data), trainer._stop_agreed)
    if evaluation is None or evaluation.get("pretraining", {}) is None:  # a stop: dropped unfinished, and
        return False, False                                                # handled after the save
    trainer.last_evaluation = (step, is_finite(evaluation["loss"]))
    if trainer.metrics is not None:
        trainer.metrics.log_eval(evaluation, step, scores)
        over = f"{len(evaluation['languages'])} " + ("tasks" if trainer.finetune is not None else "languages")
        notify(f"validation at step {step}: loss {evaluation['loss']:.4f}, perplexity "
               f"{evaluation['perplexity']:.2f} over {over}")
    return trainer.best.update(trainer.progress, step, trainer.best.value(evaluation, scores, higher_is_better))


class TestSplit:
    """The test split of a fine-tuning run: scored for the starting weights before the first step (a fresh
    run only), and for the best checkpoint at the end."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.run_dir = trainer.run_dir

    def score_start(self) -> None:
        """Collective; only before the first step of a fresh run (a resume has it already)."""
        trainer = self.trainer
        if trainer.progress.step != 0 or (self.run_dir / TEST_START_FILE).exists():
            return
        trainer.activity = "scoring the starting weights on the test split"
        scores = score_test_split(trainer)
        if trainer.context.is_main:
            write_scores(self.run_dir / TEST_START_FILE, {"step": 0, "init_from": trainer.config.checkpoint.init_from,
                                                          **scores})

    def score_best(self) -> None:
        """Collective: load the best checkpoint (else the newest) into the engine; ``RUN_DIR/test.json``."""
        from bloomtrain.checkpoint.store import BEST, latest_checkpoint, read_meta
        from bloomtrain.progress import notify, print_summary

        trainer = self.trainer
        best = trainer.checkpoints_dir / BEST
        checkpoint = best if (best / "meta.json").exists() else latest_checkpoint(trainer.checkpoints_dir)
        if checkpoint is None:
            return
        trainer.activity = "loading the best checkpoint for the test split"
        with trainer.bounds.long_phase():
            plan = trainer.checkpoints.plan_load(checkpoint)
            trainer.checkpoints.restore(plan, trainer.engine.engine, trainer.scheduler,
                                        why="the test split is scored with")
            scores = score_test_split(trainer)
        if not trainer.context.is_main:
            return
        step = read_meta(checkpoint).progress.step
        baseline = self._majority_baseline()
        write_scores(self.run_dir / TEST_FILE, {
            "checkpoint": str(checkpoint), "step": step, "metric": trainer.best.name,
            "metric_value": trainer.best.as_read(trainer.progress.best_valid_loss), **scores,
            **({"majority_baseline": baseline} if baseline else {})})
        start_file = self.run_dir / TEST_START_FILE
        start = json.loads(start_file.read_text()) if start_file.exists() else None
        print_summary({"test split": f"starting weights -> {checkpoint.name} (step {step})"
                       + ("  [majority-class baseline]" if baseline else ""), **{
            name: f"{before} -> {after}" + (f"  [{baseline[name]:.4f}]" if name in baseline else "")
            for name, before, after in comparison_rows(start, scores)}})
        notify(f"test split scored with {checkpoint}: {self.run_dir / TEST_FILE}")


    def _majority_baseline(self) -> dict[str, float]:
        """Rank 0: always answering the most frequent training label, on the same test documents."""
        config = self.trainer.config.eval
        if not config.tasks:
            return {}
        from bloomtrain.console import task_scoring_quietly
        from bloomtrain.harness.baseline import majority_scores

        with task_scoring_quietly():
            return majority_scores(config.tasks, config.tasks_include_path, "test", config.tasks_limit or None)


def score_test_split(trainer) -> dict[str, Any]:
    """Collective: each task's target loss over all its test rows, and ``eval.tasks`` on their test split."""
    import dataclasses

    from bloomtrain.evaluation import TargetValidation

    result: dict[str, Any] = {}
    if trainer.finetune.test:
        layout = dataclasses.replace(trainer.batch_layout, rampup=None)
        result.update(TargetValidation(trainer.finetune.test, layout, iters=2**31).run(trainer.engine.evaluate_step))
    if trainer.task_scores is not None:
        trainer.activity = "scoring eval.tasks on the test split"
        with trainer.bounds.long_phase():
            result["tasks"] = trainer.task_scores.run(split="test")
    return result


def write_scores(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=float) + "\n")


def comparison_rows(start: dict[str, Any] | None, best: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(score, starting weights, best checkpoint) rows for the terminal."""
    def flat(scores: dict[str, Any] | None) -> dict[str, float]:
        if not scores:
            return {}
        values = {f"loss/{name}": entry["loss"] for name, entry in scores.get("languages", {}).items()}
        if "loss" in scores:
            values["loss"] = scores["loss"]
        values.update(scores.get("tasks", {}))
        return values

    before, after = flat(start), flat(best)
    return [(name, f"{before[name]:.4f}" if name in before else "-", f"{after[name]:.4f}")
            for name in sorted(after)]
