"""``data.*`` and ``eval.*``: what the run reads and how it is validated."""

from __future__ import annotations

from dataclasses import dataclass, field

from bloomtrain.config.errors import require


@dataclass
class DataConfig:
    kind: str = "pretraining"
    """pretraining (text from the data pipeline) | finetune (prompt/target pairs from data_tools.finetune:
    packed rows, the loss on targets only; experiment=finetune sets it). data.blend must hold that kind."""
    blend: str | None = None
    """Blend file written by the data pipeline (or by data_tools.finetune); null trains on the bundled
    multilingual sample."""
    cache_dir: str = "~/.cache/bloomtrain"
    """Where the bundled sample's tokenizer and tokens are prepared on first use."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    packing: str = "best_fit"
    """Fine-tuning only: how whole examples are packed into rows of train.seq_length: best_fit (best-fit
    decreasing, the fewest rows) or greedy (in the shuffled order)."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "data.num_workers must be >= 0")
        require(self.kind in ("pretraining", "finetune"), f"data.kind={self.kind!r} is not pretraining or finetune")
        require(self.packing in ("best_fit", "greedy"), f"data.packing={self.packing!r} is not best_fit or greedy")


@dataclass
class EvalConfig:
    """Validation on each language's held-out tokens (the blend's ``valid_prefix`` files), and downstream
    task scores on the running model (``tasks``, docs/evaluation.md)."""

    interval: int = 1000
    """Evaluate every N optimizer steps and after the last one; 0 = never."""
    iters: int = 10
    """Global batches per language in one evaluation: the same fixed samples every time."""
    early_stop_patience: int = 0
    """Stop (with a checkpoint, exit 0) after this many evaluations without a new best ``eval.metric``;
    0 = never."""
    metric: str = "loss"
    """What "best" means: loss (the validation loss; lower is better) or TASK/METRIC, a score of eval.tasks
    as logged under tasks/ (e.g. nusax_sentiment/f1; higher is better unless the task says otherwise).
    A fine-tuning run, or any run naming a task metric, keeps checkpoints/best by it."""
    pretraining_blend: str | None = None
    """Fine-tuning: a pretraining blend (the starting model's data) whose validation sets are evaluated too,
    logged as pretraining/<language>: does the model forget?"""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks or groups scored on the running model, e.g. [nusax_sentiment, heldout]; logged as
    tasks/<task>/<metric>. Needs lm-eval (pip install 'bloomtrain[eval]')."""
    tasks_interval: int = 0
    """Score the tasks every N steps and after the last; 0 = with every evaluation (eval.interval)."""
    tasks_limit: int = 0
    """Documents per task (the first N of its evaluation split); 0 = all of them."""
    tasks_num_fewshot: int = 0
    """Examples put before each document, drawn from the task's few-shot split."""
    tasks_batch_size: int = 8
    """Rows scored per forward pass (per data-parallel rank)."""
    tasks_max_length: int = 0
    """Tokens the model sees at once when scoring (contexts are cut from the left); 0 = train.seq_length."""
    tasks_split: str = "validation"
    """Which documents of each task are scored during training: validation (where a task has that split;
    choosing a checkpoint by these never sees the test documents) or test (lm-eval's choice)."""
    tasks_include_path: list[str] = field(default_factory=list)
    """Folders of task YAMLs of your own (as python -m bloomtrain.harness --include_path)."""

    def __post_init__(self) -> None:
        require(self.interval >= 0, "eval.interval must be >= 0 (0 = no evaluation)")
        require(self.iters >= 1, "eval.iters must be >= 1")
        require(self.early_stop_patience >= 0, "eval.early_stop_patience must be >= 0 (0 = never)")
        require(not self.tasks or bool(self.tasks_interval or self.interval),
                "eval.tasks needs eval.tasks_interval > 0 or eval.interval > 0 (when to score them)")
        require(self.tasks_interval >= 0 and self.tasks_limit >= 0 and self.tasks_num_fewshot >= 0,
                "eval.tasks_interval, eval.tasks_limit and eval.tasks_num_fewshot must be >= 0")
        require(self.tasks_batch_size >= 1, "eval.tasks_batch_size must be >= 1")
        require(self.tasks_split in ("validation", "test"), f"eval.tasks_split={self.tasks_split!r} is not "
                "validation or test")
        require(self.tasks_max_length == 0 or self.tasks_max_length >= 2,
                "eval.tasks_max_length must be >= 2 (0 = train.seq_length)")
