"""The majority-class baseline of multiple-choice tasks: always answering the label most frequent in the
task's training split, scored on the documents lm-eval would score (the same split and limit), with the
same metrics when the task names them (``acc``, and ``f1`` as macro-F1 over the choices). Groups get the
document-weighted mean of their tasks, as lm-eval's ``weight_by_size`` aggregation.

A model's score next to this says whether it learned the task or only its label distribution.
"""

from __future__ import annotations

from collections import Counter


def majority_scores(names: list[str], include_paths: list[str] = (), split: str = "test",
                    limit: int | None = None) -> dict[str, float]:
    """``{"<task>/acc": ..., "<task>/f1": ...}`` for every multiple-choice task (and group) among ``names``
    that has a training split; other tasks are left out."""
    from sklearn.metrics import f1_score

    from bloomtrain.harness.suite import task_manager

    manager = task_manager(list(names), list(include_paths))
    loaded = manager.load(list(names))
    scores: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice" or not task.has_training_docs():
            continue
        majority = Counter(task.doc_to_target(doc) for doc in task.training_docs()).most_common(1)[0][0]
        docs = task.validation_docs() if split == "validation" and task.has_validation_docs() else task.eval_docs
        gold = [task.doc_to_target(doc) for doc in list(docs)[:limit]]
        choices = list(range(max(len(task.doc_to_choice(doc)) for doc in list(docs)[:limit])))
        scores[f"{name}/acc"] = sum(label == majority for label in gold) / len(gold)
        scores[f"{name}/f1"] = float(f1_score(gold, [majority] * len(gold), labels=choices, average="macro",
                                              zero_division=0))
        sizes[name] = len(gold)
    for group, members in _group_members(loaded).items():
        counted = [member for member in members if member in sizes]
        if counted and len(counted) == len(members):
            total = sum(sizes[member] for member in counted)
            for metric in ("acc", "f1"):
                scores[f"{group}/{metric}"] = sum(scores[f"{member}/{metric}"] * sizes[member]
                                                  for member in counted) / total
    return scores


def _group_members(loaded) -> dict[str, list[str]]:
    members = {}
    for name, group in loaded.get("groups", {}).items():
        children = getattr(group, "get_all_tasks", None)
        tasks = children() if children is not None else []
        members[name] = [getattr(task, "task_name", None) or task.config.task for task in tasks]
    return members
