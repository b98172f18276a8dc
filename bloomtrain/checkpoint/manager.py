"""One checkpoint manager: saves and restores a run's whole state together, on every rank at once.

Saved together: model and optimizer (DeepSpeed's files: module shards, ZeRO partitions, loss scaler),
and in DeepSpeed's client state the LR scheduler, the RNG states of each rank and the
``universal_checkpoint_info`` for re-sharding; beside them ``meta.json`` with the step, the data
position (consumed samples and tokens), the W&B run id, the layout, the model, the resolved config,
the git commit and the tokenizer's fingerprint, a copy of the tokenizer in ``tokenizer/``, and
``manifest.json`` with every file's size and SHA-256. A run refuses a checkpoint whose tokenizer differs
from its data's.

A save writes ``step_N.tmp``, has every rank hash a share of the files, writes the manifest, fsyncs,
renames to ``step_N`` and only then moves ``latest`` (see ``store.py``). Resuming verifies the newest
checkpoint against its manifest (ranks share the hashing) and falls back to the previous complete one,
saying so in one line, if it is damaged.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bloomtrain.checkpoint import store
from bloomtrain.checkpoint.rng import rng_state, set_rng_state
from bloomtrain.checkpoint.safe_load import weights_only_loads
from bloomtrain.checkpoint.store import CheckpointError, TrainingProgress
from bloomtrain.checkpoint.universal import convert_to_universal, universal_checkpoint_info
from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import to_yaml
from bloomtrain.data.tokenizer import install_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "vocab_pad_multiple")


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shared_problems(directory: Path) -> list[str]:
    """Collective: ``directory``'s problems against its manifest, each rank hashing a share of the files."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = _broadcast(store.manifest_files(directory) if rank == 0 else None)
    if not names:
        return [f"no readable {store.MANIFEST_FILE} (the save did not finish)"]
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, store.manifest_problems(directory, names[rank::world]))
    return [problem for problems in gathered for problem in problems]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


class CheckpointManager:
    def __init__(self, config: BloomTrainConfig, layout: dict[str, Any], padded_vocab_size: int,
                 tokenizer: str) -> None:
        self.config = config
        self.layout = layout
        self.padded_vocab_size = padded_vocab_size
        self.tokenizer = tokenizer
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.checkpoints_dir = Path(config.run.dir) / "checkpoints"
        self.is_main = dist.get_rank() == 0
        self._commit = git_commit() if self.is_main else None

    # ------------------------------------------------------------------------------------------- saving

    def save(self, engine, progress: TrainingProgress, client_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the new checkpoint's directory."""
        tag = f"step_{progress.step}"
        staging, final = self.checkpoints_dir / f"{tag}.tmp", self.checkpoints_dir / tag
        if self.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        state = {**client_state, "rng": rng_state(), "universal_checkpoint_info": universal_checkpoint_info()}
        engine.save_checkpoint(str(self.checkpoints_dir), tag=staging.name, save_latest=False, client_state=state)
        dist.barrier()
        if self.is_main:
            install_tokenizer(self.tokenizer, staging / store.TOKENIZER_DIR)
            store.write_meta(staging, progress, self.config.model, self.layout, self.padded_vocab_size,
                             extra={"git_commit": self._commit, "config": to_yaml(self.config),
                                    "tokenizer": self.tokenizer_fingerprint})
            (staging / "config.yaml").write_text(to_yaml(self.config))
        names = _broadcast(store.list_files(staging) if self.is_main else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered: list[dict[str, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, {name: store.file_digest(staging / name) for name in names[rank::world]})
        if self.is_main:
            store.write_manifest(staging, {k: v for part in gathered for k, v in part.items()})
            store.publish(staging, final)
            for removed in store.prune(self.checkpoints_dir, self.config.checkpoint.keep,
                                       self.config.checkpoint.keep_every):
                logger.info("removed old checkpoint %s", removed.name)
        dist.barrier()
        return final

    # ----------------------------------------------------------------------------------------- resuming

    def resume_point(self) -> Path | None:
        """Collective: the checkpoint this run starts from (per ``checkpoint.resume``), verified; or None."""
        resume = str(self.config.checkpoint.resume)
        existing = store.published_checkpoints(self.checkpoints_dir)
        if resume.lower() in ("false", "none", "no", "0"):
            if existing:
                raise ConfigError(f"checkpoint.resume=false but {self.checkpoints_dir} already holds "
                                  f"{existing[0].name}; set checkpoint.resume=auto to continue that run or "
                                  "choose a new run.dir")
            return None
        if resume != "auto":
            try:
                checkpoint = store.resolve_checkpoint(resume)
            except FileNotFoundError as error:
                raise ConfigError(f"checkpoint.resume: {error}") from None
            problems = _shared_problems(checkpoint)
            if problems:
                raise CheckpointError(f"checkpoint {checkpoint} is damaged: {problems[0]}")
            return checkpoint
        for checkpoint in existing:
            problems = _shared_problems(checkpoint)
            if not problems:
                return checkpoint
            if self.is_main:
                print(f"bloomtrain: checkpoint {checkpoint} is incomplete or damaged ({problems[0]}"
                      f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                      "falling back to the previous one", flush=True)
        return None

    def check_compatible(self, checkpoint: Path) -> store.CheckpointMeta:
        meta = store.read_meta(checkpoint)
        for field in ARCHITECTURE_FIELDS:
            saved, wanted = getattr(meta.model, field), getattr(self.config.model, field)
            if saved != wanted:
                raise ConfigError(f"{checkpoint} was written with model.{field}={saved} but the config says "
                                  f"model.{field}={wanted}; use the same model or a new run.dir")
        if meta.tokenizer and meta.tokenizer != self.tokenizer_fingerprint:
            raise ConfigError(
                f"{checkpoint} was trained on data tokenized with another tokenizer ({meta.tokenizer['library']} "
                f"{meta.tokenizer['sha256'][:12]}) than data.blend's ({self.tokenizer_fingerprint['library']} "
                f"{self.tokenizer_fingerprint['sha256'][:12]}, {self.tokenizer}); tokenize the data with "
                f"python -m data_tools.pipeline tokenizer.existing={checkpoint / store.TOKENIZER_DIR} ...")
        tensor = self.layout["tensor"]
        if meta.padded_vocab_size and meta.padded_vocab_size % tensor:
            raise ConfigError(f"{checkpoint} holds a vocabulary padded to {meta.padded_vocab_size} rows, which "
                              f"parallel.tensor={tensor} does not divide; choose a tensor size that does")
        return meta

    def needs_universal(self, meta: store.CheckpointMeta) -> bool:
        keys = ("tensor", "pipeline", "data", "zero_stage")
        return not meta.weights_only and any(meta.layout.get(k, 0) != self.layout[k] for k in keys)

    def prepare_universal(self, checkpoint: Path) -> Path:
        """Collective: convert on rank 0 (once) while the others wait; returns the universal directory."""
        out = self.checkpoints_dir / "universal" / checkpoint.name
        error = None
        if self.is_main:
            try:
                convert_to_universal(checkpoint, out)
            except ValueError as failure:
                error = str(failure)
        error = _broadcast(error)
        if error:
            raise ConfigError(error)
        return out

    def load(self, engine, checkpoint: Path, universal: bool) -> dict[str, Any]:
        """Collective: model, optimizer and RNG into ``engine``; returns the rest of the client state."""
        try:
            with weights_only_loads():
                _, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            raise CheckpointError(f"{checkpoint} holds objects other than tensors and plain data "
                                  f"({found.group(1) if found else 'unknown'}), which bloomtrain does not unpickle"
                                  ) from None
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {checkpoint}")
        rng = client_state.pop("rng", None)
        if rng is not None and not universal:  # another layout's ranks had other RNG streams
            set_rng_state(rng)
        return client_state
