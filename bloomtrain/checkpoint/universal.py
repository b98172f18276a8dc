"""Resuming under another (tensor, pipeline, data) layout, through DeepSpeed's universal checkpoint.

Saving puts ``universal_checkpoint_info`` in every checkpoint (as Megatron-DeepSpeed does): which
parameters are replicated over the tensor group, which are row-parallel (joined along dim 1; all
others along dim 0) and which are tied between the first and last pipeline stage. When a run resumes
under a different layout, rank 0 converts the checkpoint with DeepSpeed's ``ds_to_universal`` into
the run's ``checkpoints/universal/step_N/``: one directory per parameter holding the full fp32 weight and its
Adam moments. The new engine, started with ``checkpoint.load_universal``, then takes its own slice of
each (DeepSpeed's ``load_universal``).

DeepSpeed names parameter directories after the module that saved them, and our plain model and our
``PipelineModule`` name the same parameter differently (``h.0.`` vs ``2.block.``). After converting,
every directory is renamed to the plain name and given a symlink under the pipeline name, so any
layout finds its parameters. The vocabulary padding is kept as saved (the padded rows are trained
too); a new tensor size must divide the saved padded vocabulary.

This needs ZeRO stage 1 or higher on both sides: the converter reads ZeRO's flat optimizer partitions.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

from bloomtrain.checkpoint.safe_load import weights_only_loads
from bloomtrain.checkpoint.store import read_meta
from bloomtrain.parallel.names import (
    REPLICATED_PARAMETER_PATTERNS,
    ROW_PARALLEL_PARAMETER_PATTERNS,
    is_pipeline_name,
    pipeline_names,
    plain_name,
    tied_prefixes,
)

logger = logging.getLogger(__name__)

DONE_MARKER = "bloomtrain_universal_done"


def universal_checkpoint_info() -> dict:
    from deepspeed.checkpoint import constants

    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants.TP_REPLICATED_PARAMETER_PATTERNS: REPLICATED_PARAMETER_PATTERNS,
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: ROW_PARALLEL_PARAMETER_PATTERNS,
        constants.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [re.escape(prefix) for prefix in tied_prefixes()],
    }


def convert_to_universal(checkpoint: Path, out: Path) -> Path:
    """Rank 0 only: write the universal form of ``checkpoint`` into ``out`` (once; reused after)."""
    if (out / DONE_MARKER).exists():
        return out
    meta = read_meta(checkpoint)
    if meta.layout.get("zero_stage", 0) < 1:
        raise ValueError(f"{checkpoint} was saved with parallel.zero_stage=0; DeepSpeed's universal checkpoint "
                         "(needed for a new layout) reads ZeRO's optimizer partitions. Resume it with its own "
                         f"layout {_layout_text(meta.layout)}, or train with parallel.zero_stage>=1")
    from deepspeed.checkpoint import ds_to_universal

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(staging), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    logger.info("converting %s to a universal checkpoint in %s", checkpoint, out)
    with weights_only_loads():
        ds_to_universal.main(args)
    _name_parameters_for_every_layout(staging / "zero", meta.model.num_layers)
    (staging / DONE_MARKER).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def _name_parameters_for_every_layout(zero_dir: Path, num_layers: int) -> None:
    saved = [p.name for p in zero_dir.iterdir() if p.is_dir()]
    if any(is_pipeline_name(name) for name in saved):
        for name in saved:
            os.replace(zero_dir / name, zero_dir / plain_name(name, num_layers))
    plain = [p.name for p in zero_dir.iterdir() if p.is_dir()]
    for plain_name_, pipe_name in pipeline_names(num_layers, plain).items():
        (zero_dir / pipe_name).symlink_to(plain_name_, target_is_directory=True)


def _layout_text(layout: dict) -> str:
    return "parallel.tensor={tensor} parallel.pipeline={pipeline} parallel.data={data}".format(**layout)
