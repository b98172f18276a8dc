"""Which tasks to run and running them: the task suites shipped in ``tasks/``, any lm-eval task, and the
held-out perplexity of a data pipeline's validation text; the results flattened to ``task/metric``.

- ``nusax_sentiment`` (and ``nusax_sentiment_<lang>``, 12 languages), ``nusax_mt`` (and
  ``nusax_mt_<src>_<tgt>``): YAML in ``tasks/nusax/`` over data shipped beside it.
- ``heldout`` (and ``heldout_<lang>``): each language's validation documents of a blend (the token files
  the data pipeline holds out, decoded back to text), scored as rolling log-likelihoods; ``loss`` is the
  mean negative log-likelihood per token, comparable with ``bloomtrain.evaluate``'s per-language loss.
- any other name: lm-eval's own task index (built only when a name is not one of ours; it needs the
  task's dataset, i.e. network access or a filled Hugging Face cache), or ``--include_path`` folders.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
HELDOUT = "heldout"


class HarnessError(ValueError):
    """A problem with the harness's input, said in one line that names the fix."""


def task_manager(names: list[str], include_paths: list[str] = ()):
    """lm-eval's task index over the shipped suites (and ``include_paths``); lm-eval's ~15,000 own tasks
    are indexed (seconds) only when a name is not found there."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    for path in include_paths:
        check_yaml_files(Path(path))
    manager = TaskManager(include_path=paths, include_defaults=False, verbosity="ERROR")
    wanted = [name for name in names if not name.startswith(HELDOUT)]
    if all(name in manager.all_tasks for name in wanted):
        return manager
    manager = TaskManager(include_path=paths, include_defaults=True, verbosity="ERROR")
    unknown = [name for name in wanted if name not in manager.all_tasks and not name.endswith(".yaml")]
    if unknown:
        shipped = sorted({name.rsplit("_", 1)[0] for name in TaskManager(include_path=str(TASKS_DIR),
                                                                             include_defaults=False).all_tasks
                          if not name.endswith("_tasks")})
        raise HarnessError(f"unknown task {', '.join(unknown)}: the shipped suites are {', '.join(shipped)} "
                           f"and {HELDOUT}; lm-eval's are listed by `lm-eval ls tasks`; a task of your own "
                           "needs --include_path FOLDER_WITH_ITS_YAML")
    return manager


def check_yaml_files(folder: Path) -> None:
    """Every task YAML under ``folder`` parses (lm-eval would skip a broken one and then not know the task)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    if not folder.exists():
        raise HarnessError(f"--include_path {folder} does not exist")
    for path in [folder] if folder.is_file() else sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise HarnessError(f"{where}: the task YAML does not parse ({problem}); fix it or leave it out of "
                               "--include_path") from None


def task_specs(names: list[str], blend=None) -> list[str | dict]:
    """lm-eval task names, with ``heldout`` / ``heldout_<lang>`` turned into task configs for ``blend``."""
    specs: list[str | dict] = []
    for name in names:
        if not name.startswith(HELDOUT):
            specs.append(name)
            continue
        if blend is None:
            raise HarnessError(f"{name} needs the data pipeline's blend: evaluate a bloomtrain run or checkpoint "
                               "(its data.blend) or give --metadata '{\"blend\": \"PATH/blend.json\"}'")
        languages = blend.validation_sets
        wanted = list(languages) if name == HELDOUT else [name.removeprefix(HELDOUT + "_")]
        missing = [language for language in wanted if language not in languages]
        if missing or not wanted:
            raise HarnessError(f"{name}: the blend holds no validation set for {', '.join(missing) or 'any language'}"
                               f" (it has: {', '.join(languages) or 'none'}); the pipeline writes them "
                               "(split.valid_fraction)")
        specs.extend(heldout_config(language, languages[language], blend.tokenizer) for language in wanted)
    return specs


def heldout_config(language: str, valid_prefix: str, tokenizer: str) -> dict[str, Any]:
    return {
        "task": f"{HELDOUT}_{language}",
        "custom_dataset": functools.partial(heldout_documents, valid_prefix, tokenizer),
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "process_results": _heldout_results,
        "metric_list": [{"metric": "loss", "aggregation": _loss_per_token, "higher_is_better": False},
                        {"metric": "token_perplexity", "aggregation": _perplexity_per_token,
                         "higher_is_better": False}],
        "metadata": {"version": 1.0},
    }


def heldout_documents(valid_prefix: str, tokenizer: str, **_: Any):
    """The validation documents of one language as text (their tokens decoded, the end-of-document token
    dropped), each with the number of tokens the harness will score in it (its text encoded again)."""
    import datasets
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from bloomtrain.data.tokenizer import TokenEncoder

    encoder = TokenEncoder(tokenizer)
    tokens = IndexedDataset(valid_prefix)
    documents = []
    for index in range(len(tokens)):
        text = encoder.decode([int(token) for token in tokens[index] if token != encoder.eos_id])
        if text.strip():
            documents.append({"text": text, "tokens": len(encoder.encode([text])[0])})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents)})


def _heldout_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    return {"loss": (loglikelihood, doc["tokens"]), "token_perplexity": (loglikelihood, doc["tokens"])}


def _loss_per_token(items: list[tuple[float, int]]) -> float:
    return -sum(loglikelihood for loglikelihood, _ in items) / sum(tokens for _, tokens in items)


def _perplexity_per_token(items: list[tuple[float, int]]) -> float:
    return math.exp(min(_loss_per_token(items), 700.0))


SPLITS = ("test", "validation")


def run_tasks(lm, names: list[str], blend=None, num_fewshot: int | None = None, limit: float | None = None,
              bootstrap_iters: int = 0, seed: int = 1234, include_paths: list[str] = (),
              metadata: dict | None = None, split: str = "test") -> dict | None:
    """lm-eval's ``simple_evaluate`` over ``names``: its results dict on the model's rank 0, None elsewhere.

    ``split="test"`` is lm-eval's choice (a task's test split when it has one, else its validation split);
    ``"validation"`` scores the validation split of every task that has one, so that scores taken during
    training to choose a checkpoint never see the test documents."""
    import lm_eval

    if split not in SPLITS:
        raise HarnessError(f"split {split!r} is not one of {SPLITS}")
    manager = task_manager(names, include_paths)
    if split == "validation":
        load = manager.load

        def load_validation_splits(tasks):
            loaded = load(tasks)
            for task in loaded["tasks"].values():
                if task.has_validation_docs():
                    task.config.test_split = None  # lm-eval scores the test split whenever one is named
            return loaded

        manager.load = load_validation_splits
    return lm_eval.simple_evaluate(model=lm, tasks=task_specs(names, blend), num_fewshot=num_fewshot, limit=limit,
                                   bootstrap_iters=bootstrap_iters, task_manager=manager, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                   log_samples=False, metadata=metadata, verbosity="ERROR")


def flat_scores(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for every task and group (lm-eval's ``none`` filter name dropped,
    standard errors left out)."""
    scores = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, filter_name = key.split(",", 1)
                name = metric if filter_name == "none" else f"{metric}_{re.sub(r'[^A-Za-z0-9_-]', '_', filter_name)}"
                scores[f"{task}/{name}"] = float(value)
    return scores
