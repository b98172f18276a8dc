"""Nothing is unpickled from a checkpoint: every ``torch.load`` made while reading one is weights-only.

DeepSpeed's loaders (its checkpoint engine, the universal-checkpoint converter and loader) call
``torch.load(..., weights_only=False)``. Inside :func:`weights_only_loads` those calls are forced to
``weights_only=True``, which reads tensors and plain containers only; the handful of small DeepSpeed
records its files hold (the loss scaler, the ZeRO stage enum, parameter-fragment addresses) are
allowed by name. A checkpoint holding anything else fails to load instead of running code.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


def _allowed_records() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_allowed_records()):
            yield
    finally:
        torch.load = original
