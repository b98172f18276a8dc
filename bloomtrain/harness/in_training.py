"""Task scores during training: ``eval.tasks`` run through lm-eval on the model the run holds, under its
layout, at evaluation time — no export, no reload.

Every rank takes part: the data-parallel ranks split each task's documents (lm-eval's sharding, gathered
over the data-parallel group), the ranks of a model-parallel group score the same rows together
(:class:`~bloomtrain.harness.scoring.EngineScorer`). The scores are those ``python -m bloomtrain.harness``
gives on the checkpoint saved at the same step (same tasks, limit, few-shot count, seed and
``max_length``), up to the precision the run computes in.
"""

from __future__ import annotations

import logging

from megatron.core import parallel_state

from bloomtrain.config import ConfigError, EvalConfig, TrainConfig
from bloomtrain.progress import notify

logger = logging.getLogger(__name__)

TASK_SEED = 1234  # lm-eval's default, as python -m bloomtrain.harness --seed


class TaskScores:
    """Built at start-up, after :func:`check_task_names` (so a bad task stops the run before its first
    step); :meth:`run_if_due` is collective."""

    def __init__(self, eval_config: EvalConfig, train: TrainConfig, vocab_size: int, engine, tokenizer_path: str,
                 blend, sequence_parallel: bool) -> None:
        from bloomtrain.data.tokenizer import TokenEncoder
        from bloomtrain.harness.lm import BloomtrainLM
        from bloomtrain.harness.scoring import EngineScorer
        from bloomtrain.harness.suite import HarnessError, task_specs

        self.names, self.blend = list(eval_config.tasks), blend
        self.include_paths = list(eval_config.tasks_include_path)
        self.interval = eval_config.tasks_interval or eval_config.interval
        self.limit = eval_config.tasks_limit or None
        self.num_fewshot = eval_config.tasks_num_fewshot
        self.split = eval_config.tasks_split
        self.higher_is_better: dict[str, bool] = {}  # "<task>/<metric>" -> as the task declares it
        try:
            task_specs(self.names, blend)
        except HarnessError as error:
            raise ConfigError(f"eval.tasks: {error}") from None
        encoder = TokenEncoder(tokenizer_path)
        scorer = EngineScorer(engine, vocab_size, sequence_parallel)
        self.lm = BloomtrainLM(scorer, encoder, eval_config.tasks_max_length or train.seq_length,
                               eval_config.tasks_batch_size, parallel_state.get_data_parallel_rank(),
                               parallel_state.get_data_parallel_world_size(),
                               parallel_state.get_data_parallel_group(), show_progress=False)

    def run_if_due(self, step: int, last_step: int, trainer) -> dict[str, float] | None:
        """Collective: the scores when ``step`` is due (said on the terminal by rank 0), else None."""
        if step != last_step and step % self.interval:
            return None
        trainer.activity = "scoring eval.tasks"
        with trainer.bounds.long_phase():  # minutes, not a step's seconds: the collectives may wait longer
            scores = self.run()
        if scores and trainer.context.is_main:
            notify(f"tasks at step {step}: " + ", ".join(f"{name} {value:.4g}" for name, value in scores.items()))
        return scores

    def run(self, split: str | None = None) -> dict[str, float]:
        """Collective: ``{"<task>/<metric>": score}`` on the ranks that hold lm-eval's results (the first
        data-parallel rank of each model-parallel group, global rank 0 among them); ``{}`` elsewhere.
        ``split`` overrides ``eval.tasks_split`` (the test split, scored once at the end of a fine-tuning run)."""
        from bloomtrain.console import task_scoring_quietly
        from bloomtrain.harness.suite import flat_scores, run_tasks

        with task_scoring_quietly():
            results = run_tasks(self.lm, self.names, self.blend, self.num_fewshot, self.limit, seed=TASK_SEED,
                                include_paths=self.include_paths, split=split or self.split)
        if results is None:
            return {}
        for task, metrics in results.get("higher_is_better", {}).items():
            for metric, higher in metrics.items():
                self.higher_is_better[f"{task}/{metric}"] = bool(higher)
        return flat_scores(results)


def check_task_names(names: list[str], include_paths: list[str] = ()) -> None:
    """Every name is a task lm-eval knows (the held-out languages are checked once the blend is read)."""
    try:
        from bloomtrain.harness.suite import HarnessError, task_manager
    except ImportError as error:
        raise ConfigError(f"eval.tasks needs lm-eval ({error}); pip install 'bloomtrain[eval]', or set "
                          "eval.tasks=[]") from None
    try:
        task_manager(list(names), list(include_paths))
    except HarnessError as error:
        raise ConfigError(f"eval.tasks: {error}") from None


def build_task_scores(config, engine, blend, sequence_parallel: bool) -> TaskScores | None:
    """The run's task scoring (``config`` is the whole BloomTrainConfig), or None without ``eval.tasks``."""
    if not config.eval.tasks:
        return None
    return TaskScores(config.eval, config.train, config.model.vocab_size, engine, blend.tokenizer, blend,
                      sequence_parallel)
