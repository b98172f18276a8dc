"""Downstream tasks on a run, a checkpoint (any parallel layout) or a Hugging Face BLOOM folder, with
EleutherAI's lm-evaluation-harness.

    python -m bloomtrain.harness PATH --tasks nusax_sentiment,nusax_mt [--num_fewshot N] [--limit N]
        [--batch_size N] [--max_length N] [--output_path FILE_OR_DIR] [--include_path DIR]
        [--metadata JSON] [--seed N] [--bootstrap_iters N]
    torchrun --nproc_per_node 4 -m bloomtrain.harness PATH --tasks ...   # the requests split over 4 processes

The flags mean what lm-eval's own command's do. The results (lm-eval's JSON, plus the checkpoint, its
step, the run's config, the code version and the seed under ``bloomtrain``) go to ``--output_path``, or
beside the checkpoint in ``harness/results_<time>.json``. fp32, on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bloomtrain.checkpoint.loading import LoadedModel, load_model
from bloomtrain.checkpoint.store import CheckpointError
from bloomtrain.config import ConfigError
from bloomtrain.console import route_library_notices


def blend_for(loaded: LoadedModel, metadata: dict) -> Any:
    """The data pipeline's blend the held-out task reads: ``--metadata``'s, else the run's ``data.blend``."""
    from bloomtrain.data.blend import read_blend, resolve_blend

    if metadata.get("blend"):
        return read_blend(metadata["blend"])
    return resolve_blend(loaded.config.data, is_main=True) if loaded.config is not None else None


def code_version() -> str:
    from importlib.metadata import version

    from bloomtrain.checkpoint.manager import git_commit

    return git_commit() or f"bloomtrain {version('bloomtrain')}"


def results_path(output_path: str | None, checkpoint: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    if output_path is None:
        return checkpoint / "harness" / f"results_{stamp}.json"
    path = Path(output_path)
    return path if path.suffix == ".json" else path / f"results_{stamp}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bloomtrain.harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, a checkpoint, or a Hugging Face BLOOM folder")
    parser.add_argument("--tasks", required=True, help="comma-separated task or group names")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens the model sees at once (default: the run's train.seq_length; 2048 for a "
                             "Hugging Face folder)")
    parser.add_argument("--output_path", default=None, help="a .json file or a folder")
    parser.add_argument("--include_path", action="append", default=[], help="a folder of task YAMLs of your own")
    parser.add_argument("--metadata", default="{}", help='JSON, e.g. \'{"blend": "PATH/blend.json"}\'')
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test: lm-eval's choice (a task's test split, else its validation split); "
                             "validation: every task's validation split where it has one")
    parser.add_argument("--bootstrap_iters", type=int, default=100000, help="for standard errors; 0: none")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2) or (
            args.limit is not None and args.limit <= 0):
        parser.error("--batch_size >= 1, --max_length >= 2 and --limit > 0 are required")
    return args


def main(argv: list[str] | None = None) -> int:
    route_library_notices()
    args = parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("bloomtrain.harness: lm-eval is not installed; pip install 'bloomtrain[eval]' (lm-eval 0.4)",
              file=sys.stderr)
        return 2
    from bloomtrain.harness.lm import BloomtrainLM
    from bloomtrain.harness.scoring import PlainScorer
    from bloomtrain.harness.suite import HarnessError, flat_scores, run_tasks

    try:
        metadata = json.loads(args.metadata)
        loaded = load_model(args.path)
        blend = blend_for(loaded, metadata)
    except json.JSONDecodeError as error:
        print(f"bloomtrain.harness: --metadata is not JSON ({error})", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as error:
        print(f"bloomtrain.harness: {error}", file=sys.stderr)
        return 2
    rank, world_size, device = _join_processes()
    scorer = PlainScorer(loaded.model, loaded.model.config.vocab_size, device)
    lm = BloomtrainLM(scorer, loaded.tokenizer, args.max_length or loaded.max_length, args.batch_size,
                      rank, world_size)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        results = run_tasks(lm, tasks, blend, args.num_fewshot, args.limit, args.bootstrap_iters, args.seed,
                            args.include_path, metadata, args.split)
    except (HarnessError, ValueError, FileNotFoundError) as error:
        print(f"bloomtrain.harness: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:  # a task of lm-eval's own whose dataset is not in the local cache
        print(f"bloomtrain.harness: {error}; that task's dataset must be downloaded (network access, or a "
              "filled Hugging Face cache); the shipped suites need none", file=sys.stderr)
        return 2
    if results is not None:
        from lm_eval.utils import handle_non_serializable, make_table

        results["bloomtrain"] = {
            "path": str(args.path), "checkpoint": str(loaded.checkpoint), "step": loaded.step,
            "code_version": code_version(), "seed": args.seed, "split": args.split, "processes": world_size,
            "max_length": lm.max_length, "scores": flat_scores(results),
            "run_config": None if loaded.config is None else json.loads(json.dumps(
                dataclasses.asdict(loaded.config), default=str))}
        out = results_path(args.output_path, loaded.checkpoint)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n")
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        print(f"results: {out}")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _join_processes() -> tuple[int, int, torch.device]:
    """Under torchrun: join its process group (NCCL on GPUs, gloo on CPU); each process holds the whole
    model and scores its share of the requests."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device
