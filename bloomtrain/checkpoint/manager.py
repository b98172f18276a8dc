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

Resuming is two calls, because the engine must be built in between:

    plan = manager.plan_resume()       # which checkpoint, through a universal one?, padded vocab, weights
    ... build the model with plan.padded_vocab_size and plan.initial_weights(), then the engine ...
    progress = manager.restore(plan, engine, scheduler)   # model, optimizer, scheduler, RNG -> progress
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bloomtrain.checkpoint import store
from bloomtrain.checkpoint.rng import rng_state, set_rng_state
from bloomtrain.checkpoint.safe_load import weights_only_loads
from bloomtrain.checkpoint.store import CheckpointError, CheckpointSaveError, TrainingProgress
from bloomtrain.checkpoint.universal import convert_to_universal, universal_checkpoint_info
from bloomtrain.checkpoint.weights import read_model_weights
from bloomtrain.config import CheckpointConfig, ConfigError, ModelConfig
from bloomtrain.data.tokenizer import install_tokenizer, tokenizer_fingerprint
from bloomtrain.parallel.layout import ParallelLayout

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


LAYOUT_KEYS = ("tensor", "pipeline", "data", "zero_stage")


@dataclass(frozen=True)
class ResumePlan:
    """What a run starts from, decided before its engine exists (the engine depends on it)."""

    checkpoint: Path | None  # the verified checkpoint to start from; None: a fresh start
    meta: store.CheckpointMeta | None
    load_from: Path | None  # what DeepSpeed loads: the checkpoint, or its universal form for a new layout
    universal: bool  # the engine must be told to load a universal checkpoint
    padded_vocab_size: int  # a checkpoint's padding is kept (its padded rows are trained too)

    @property
    def weights_only(self) -> bool:
        return self.meta is not None and self.meta.weights_only

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        """Full plain-named weights to build the model with (a weights-only start), else None."""
        return read_model_weights(self.checkpoint) if self.weights_only else None


class CheckpointManager:
    def __init__(self, config: CheckpointConfig, run_dir: Path, layout: ParallelLayout, model: ModelConfig,
                 tokenizer: str, run_config_yaml: str) -> None:
        """``tokenizer`` is the run's data tokenizer (copied into every checkpoint and checked on resume);
        ``run_config_yaml`` the run's resolved config, stored beside each checkpoint."""
        self.config = config
        self.layout = layout
        self.model = model
        self.padded_vocab_size = model.padded_vocab_size(layout.tensor)
        self.tokenizer = tokenizer
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.run_config_yaml = run_config_yaml
        self.checkpoints_dir = Path(run_dir) / "checkpoints"
        self.is_main = dist.get_rank() == 0
        self._commit = git_commit() if self.is_main else None

    def _layout_record(self) -> dict[str, int]:
        return {key: getattr(self.layout, key) for key in LAYOUT_KEYS}

    # ------------------------------------------------------------------------------------------- saving

    def save(self, engine, scheduler, progress: TrainingProgress) -> Path:
        """Collective: every rank calls it. Returns the new checkpoint's directory.

        A write that fails on any rank (disk full, quota, I/O error) fails the save on every rank with
        :class:`CheckpointSaveError`: the staging directory is removed and the previous checkpoint stays
        ``latest``; nothing of the training state changes."""
        tag = f"step_{progress.step}"
        staging, final = self.checkpoints_dir / f"{tag}.tmp", self.checkpoints_dir / tag
        if self.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        state = {"scheduler": scheduler.state_dict(), "rng": rng_state(),
                 "universal_checkpoint_info": universal_checkpoint_info()}
        with self._failing_together(tag, staging):
            engine.save_checkpoint(str(self.checkpoints_dir), tag=staging.name, save_latest=False,
                                   client_state=state)
        with self._failing_together(tag, staging):
            if self.is_main:
                install_tokenizer(self.tokenizer, staging / store.TOKENIZER_DIR)
                store.write_meta(staging, progress, self.model, self._layout_record(), self.padded_vocab_size,
                                 extra={"git_commit": self._commit, "config": self.run_config_yaml,
                                        "tokenizer": self.tokenizer_fingerprint})
                (staging / "config.yaml").write_text(self.run_config_yaml)
        names = _broadcast(store.list_files(staging) if self.is_main else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered: list[dict[str, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, {name: store.file_digest(staging / name) for name in names[rank::world]})
        with self._failing_together(tag, staging):
            if self.is_main:
                store.write_manifest(staging, {k: v for part in gathered for k, v in part.items()})
                store.publish(staging, final)
        if self.is_main:
            for removed in store.prune(self.checkpoints_dir, self.config.keep, self.config.keep_every):
                logger.info("removed old checkpoint %s", removed.name)
        dist.barrier()
        return final

    @contextlib.contextmanager
    def _failing_together(self, tag: str, staging: Path) -> Iterator[None]:
        """Collective: run the block on every rank, then agree; if it failed anywhere, clean up and raise
        :class:`CheckpointSaveError` everywhere (a rank left alone in the next collective would hang)."""
        failure = None
        try:
            yield
        except (OSError, RuntimeError) as error:
            failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        failures: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        bad = [(rank, text) for rank, text in enumerate(failures) if text is not None]
        if not bad:
            return
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        previous = store.latest_checkpoint(self.checkpoints_dir)
        kept = f"{previous} is intact and still latest" if previous else "there is no earlier checkpoint"
        rank, text = bad[0]
        raise CheckpointSaveError(f"saving checkpoint {tag} failed on rank {rank} ({text}); the partial save was "
                                  f"removed and {kept}. Free space under {self.checkpoints_dir} (or lower "
                                  "checkpoint.keep)")

    # ----------------------------------------------------------------------------------------- resuming

    def plan_resume(self) -> ResumePlan:
        """Collective: the checkpoint this run starts from (per ``checkpoint.resume``), verified and checked
        against the run; converted to a universal checkpoint (on rank 0, once) when the layout changed."""
        checkpoint = self._resume_point()
        initialising = checkpoint is None and bool(self.config.init_from)
        if initialising:
            checkpoint = self._init_point()
        if checkpoint is None:
            return ResumePlan(None, None, None, False, self.padded_vocab_size)
        meta = self._check_compatible(checkpoint)
        if initialising:  # weights only: a fresh optimizer, schedule and step count
            meta = dataclasses.replace(meta, weights_only=True, progress=TrainingProgress())
        universal = not meta.weights_only and any(meta.layout.get(key, 0) != value
                                                  for key, value in self._layout_record().items())
        if meta.padded_vocab_size:
            self.padded_vocab_size = meta.padded_vocab_size  # later saves keep the trained padding rows
        load_from = self._prepare_universal(checkpoint) if universal else checkpoint
        return ResumePlan(checkpoint, meta, load_from, universal, self.padded_vocab_size)

    def plan_load(self, checkpoint: Path) -> ResumePlan:
        """Collective: a checkpoint of this run to load into the running engine (the best one, for the test
        split), through its universal form when it was saved under another layout."""
        meta = store.read_meta(checkpoint)
        universal = any(meta.layout.get(key, 0) != value for key, value in self._layout_record().items())
        load_from = self._prepare_universal(checkpoint) if universal else checkpoint
        return ResumePlan(checkpoint, meta, load_from, universal, self.padded_vocab_size)

    def plan_rollback(self) -> ResumePlan | None:
        """Collective: the newest complete checkpoint of this run saved under this layout (what a loss-spike
        rollback loads into the running engine), or None."""
        for checkpoint in store.published_checkpoints(self.checkpoints_dir):
            meta = store.read_meta(checkpoint)
            if meta.weights_only or any(meta.layout.get(key) != value for key, value in self._layout_record().items()):
                return None
            if not _shared_problems(checkpoint):
                return ResumePlan(checkpoint, meta, checkpoint, False, self.padded_vocab_size)
        return None

    def restore(self, plan: ResumePlan, engine, scheduler, why: str = "resumed from") -> TrainingProgress:
        """Collective: model, optimizer, scheduler and RNG from ``plan`` into a run; returns where it stands."""
        if plan.checkpoint is None:
            return TrainingProgress()
        if plan.weights_only:  # the weights went into the model as it was built
            if self.is_main:
                logger.info("starting from the weights in %s", plan.checkpoint)
            return TrainingProgress()
        client_state = self._load(engine, plan.load_from, plan.universal)
        scheduler.load_state_dict(client_state["scheduler"])
        progress = plan.meta.progress
        if self.is_main:
            how = f" (re-sharded from {plan.meta.layout} through a universal checkpoint)" if plan.universal else ""
            logger.info("%s %s at step %d, %d samples consumed%s", why, plan.checkpoint, progress.step,
                        progress.consumed_samples, how)
        return progress

    def _resume_point(self) -> Path | None:
        resume = str(self.config.resume)
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
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                logger.warning("checkpoint %s is incomplete or damaged (%s%s); falling back to the previous one",
                               checkpoint, problems[0], more)
        return None

    def _init_point(self) -> Path:
        """Collective: ``checkpoint.init_from`` as a checkpoint; a Hugging Face folder is converted once (rank
        0) into ``RUN_DIR/init``."""
        from bloomtrain.checkpoint.hf import from_hf_to_checkpoint, is_hugging_face_dir

        source = Path(str(self.config.init_from)).expanduser()
        if not is_hugging_face_dir(source):
            try:
                checkpoint = store.resolve_checkpoint(source)
            except FileNotFoundError as error:
                raise ConfigError(f"checkpoint.init_from: {error}; give a bloomtrain run or checkpoint, or a "
                                  "Hugging Face BLOOM folder") from None
            problems = _shared_problems(checkpoint)
            if problems:
                raise CheckpointError(f"checkpoint.init_from={checkpoint} is damaged: {problems[0]}")
            return checkpoint
        converted, error = self.checkpoints_dir.parent / "init", None
        if self.is_main and not (converted / store.LATEST).is_file():
            try:
                from_hf_to_checkpoint(source, converted)
            except (OSError, ValueError, KeyError) as failure:
                error = f"checkpoint.init_from={source}: not a BLOOM model Hugging Face can read ({failure})"
        error = _broadcast(error)
        if error:
            raise ConfigError(error)
        return store.resolve_checkpoint(converted)

    def _check_compatible(self, checkpoint: Path) -> store.CheckpointMeta:
        meta = store.read_meta(checkpoint)
        for field in ARCHITECTURE_FIELDS:
            saved, wanted = getattr(meta.model, field), getattr(self.model, field)
            if saved != wanted:
                raise ConfigError(f"{checkpoint} was written with model.{field}={saved} but the config says "
                                  f"model.{field}={wanted}; use the same model or a new run.dir")
        if meta.tokenizer and meta.tokenizer != self.tokenizer_fingerprint:
            raise ConfigError(
                f"{checkpoint} was trained on data tokenized with another tokenizer ({meta.tokenizer['library']} "
                f"{meta.tokenizer['sha256'][:12]}) than data.blend's ({self.tokenizer_fingerprint['library']} "
                f"{self.tokenizer_fingerprint['sha256'][:12]}, {self.tokenizer}); tokenize the data with "
                f"python -m data_tools.pipeline tokenizer.existing={checkpoint / store.TOKENIZER_DIR} ...")
        tensor = self.layout.tensor
        if meta.padded_vocab_size and meta.padded_vocab_size % tensor:
            raise ConfigError(f"{checkpoint} holds a vocabulary padded to {meta.padded_vocab_size} rows, which "
                              f"parallel.tensor={tensor} does not divide; choose a tensor size that does")
        return meta

    def _prepare_universal(self, checkpoint: Path) -> Path:
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

    def _load(self, engine, checkpoint: Path, universal: bool) -> dict[str, Any]:
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
