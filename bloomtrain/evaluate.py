"""Per-language validation loss and perplexity of a run, a checkpoint or a Hugging Face BLOOM directory.

    python -m bloomtrain.evaluate RUN_OR_CHECKPOINT_DIR [key=value ...] [--json OUT]
    python -m bloomtrain.evaluate HF_BLOOM_DIR data.blend=BLEND [key=value ...] [--json OUT]

A run or checkpoint (any parallel layout) is evaluated with the config it was trained with, so the
samples are the ones in-training evaluation reads (``train.seq_length``, ``train.global_batch_size``,
``train.seed``, ``eval.iters``, the blend's validation files) and the numbers are the same; any of
those keys can be overridden. One process, fp32, on the GPU when there is one. A Hugging Face model has
exactly ``vocab_size`` output columns, so its loss is taken over those (a bloomtrain checkpoint's over its
padded vocabulary, as in training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bloomtrain.checkpoint.hf import from_hf, is_hugging_face_dir
from bloomtrain.checkpoint.store import CheckpointError, read_meta, resolve_checkpoint
from bloomtrain.checkpoint.weights import checkpoint_model
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config, to_validated
from bloomtrain.console import route_library_notices
from bloomtrain.data.tokenizer import tokenizer_fingerprint


def load_model_and_config(path: Path, overrides: list[str]) -> tuple[torch.nn.Module, BloomTrainConfig, int | None]:
    """The plain model, the config to evaluate with, and the columns to score (None: all)."""
    if is_hugging_face_dir(path):
        model = from_hf(path)
        return model, load_config(overrides), model.config.vocab_size
    checkpoint = resolve_checkpoint(path)
    trained_with = OmegaConf.load(checkpoint / "config.yaml")
    config = to_validated(OmegaConf.merge(OmegaConf.structured(BloomTrainConfig), trained_with,
                                          OmegaConf.from_dotlist(overrides)))
    return checkpoint_model(checkpoint), config, None


def evaluate(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """``{"loss", "perplexity", "languages": {lang: {"loss", "perplexity", "tokens"}}}`` of the model at ``path``."""
    # megatron-core (datasets) is imported here, once main() has silenced its import-time notices.
    from bloomtrain.data.blend import resolve_blend
    from bloomtrain.data.loader import BatchLayout, build_validation_datasets, load_tokenizer
    from bloomtrain.evaluation import MicroBatches, Validation

    path = Path(path)
    model, config, scored_columns = load_model_and_config(path, list(overrides))
    blend = resolve_blend(config.data, is_main=True)
    if not blend.validation_sets:
        raise ConfigError(f"the blend {config.data.blend or '(bundled sample)'} lists no validation sets "
                          "(valid_prefix); point data.blend at a data pipeline's blend.json")
    if not is_hugging_face_dir(path):
        saved = read_meta(resolve_checkpoint(path)).tokenizer
        if saved and saved != tokenizer_fingerprint(blend.tokenizer):
            raise ConfigError(f"{path} was trained with another tokenizer than data.blend's ({blend.tokenizer}); "
                              "evaluate on data tokenized with the checkpoint's tokenizer/")
    train = config.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    datasets = build_validation_datasets(blend, load_tokenizer(blend.tokenizer), train.seq_length,
                                         config.eval.iters * train.global_batch_size, train.seed,
                                         Path(config.data.cache_dir).expanduser() / "eval_index")
    layout = BatchLayout(train.micro_batch_size, train.global_batch_size)

    @torch.no_grad()
    def loss_of(micro_batches: MicroBatches) -> float:
        losses = []
        for batch in micro_batches:
            logits = model(batch["tokens"].to(device)).float()
            if scored_columns is not None:
                logits = logits[..., :scored_columns]
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].to(device).flatten()))
        return (sum(losses) / len(losses)).item()

    return Validation(datasets, layout, config.eval.iters, train.seq_length).run(loss_of)


def table(evaluation: dict[str, Any]) -> str:
    lines = [f"{'language':10}{'loss':>10}{'perplexity':>14}{'tokens':>12}"]
    for language, values in evaluation["languages"].items():
        lines.append(f"{language:10}{values['loss']:>10.4f}{values['perplexity']:>14.2f}{values['tokens']:>12,}")
    total = sum(values["tokens"] for values in evaluation["languages"].values())
    lines.append(f"{'overall':10}{evaluation['loss']:>10.4f}{evaluation['perplexity']:>14.2f}{total:>12,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomtrain.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, a checkpoint, or a Hugging Face BLOOM directory")
    parser.add_argument("overrides", nargs="*", help="config keys, e.g. data.blend=PATH eval.iters=20")
    parser.add_argument("--json", help="also write the result as JSON to this file ('-': stdout only)")
    args = parser.parse_args(argv)
    route_library_notices()
    try:
        evaluation = evaluate(args.path, args.overrides)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"bloomtrain.evaluate: {error}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(evaluation))
        return 0
    print(table(evaluation))
    if args.json:
        Path(args.json).write_text(json.dumps(evaluation, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
