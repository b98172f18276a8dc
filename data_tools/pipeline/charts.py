"""The report's two charts, drawn from ``report.json``'s per-language section with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def funnel_chart(languages: dict, path: Path) -> Path:
    """Per language (rows) and step (columns): documents left after the step, coloured by the share of
    the language's identified documents that is left."""
    plt = _pyplot()
    import numpy as np

    names = [language for language, entry in languages.items() if entry["funnel"]]
    steps = [row["step"] for row in languages[names[0]]["funnel"]] if names else []
    counts = np.array([[row["documents"] for row in languages[name]["funnel"]] for name in names], dtype=float)
    shares = counts / np.maximum(counts[:, :1], 1) if names else counts
    figure, axis = plt.subplots(figsize=(1.6 * len(steps) + 2.5, 0.38 * len(names) + 1.8))
    axis.imshow(shares, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for row in range(len(names)):
        for column in range(len(steps)):
            axis.text(column, row, f"{int(counts[row, column]):,} ({shares[row, column]:.0%})", ha="center",
                      va="center", fontsize=7)
    axis.set_xticks(range(len(steps)), [f"after {step}" for step in steps], fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_title("documents left per language after each step (share of those identified)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def tokens_chart(languages: dict, path: Path) -> Path:
    """Tokens written per language (train and validation) beside the tokenizer's fertility."""
    plt = _pyplot()

    names = [language for language, entry in languages.items() if sum(entry["tokens"].values())]
    train = [languages[name]["tokens"]["train"] for name in names]
    valid = [languages[name]["tokens"]["valid"] for name in names]
    figure, (tokens_axis, fertility_axis) = plt.subplots(1, 2, figsize=(11, 0.32 * len(names) + 1.8), sharey=True)
    tokens_axis.barh(names, train, color="#4c72b0", label="train")
    tokens_axis.barh(names, valid, left=train, color="#dd8452", label="validation")
    tokens_axis.set_xlabel("tokens written")
    tokens_axis.legend(loc="lower right", fontsize=8)
    tokens_axis.invert_yaxis()
    values = [languages[name]["fertility"]["value"] or 0 for name in names]
    by_characters = [languages[name]["fertility"]["unit"] == "tokens per character" for name in names]
    fertility_axis.barh(names, values, color=["#55a868" if chars else "#8172b2" for chars in by_characters])
    for row, (value, chars) in enumerate(zip(values, by_characters, strict=True)):
        fertility_axis.text(value, row, f" {value:.2f}/{'char' if chars else 'word'}", va="center", fontsize=7)
    fertility_axis.set_xlabel("fertility: tokens per word (per character for languages without spaces)")
    figure.suptitle("tokens per language and the tokenizer's fertility", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
