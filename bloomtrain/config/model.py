"""``model.*``: the shape of the BLOOM decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bloomtrain.config.errors import require


@dataclass
class ModelConfig:
    """Shape of the BLOOM decoder. Presets live in ``conf/model/``."""

    name: str = "bloom-tiny"
    """Preset name, recorded for the run's metadata."""
    hidden_size: int = 128
    """Width of the residual stream (BLOOM-176B: 14336)."""
    num_layers: int = 4
    """Transformer blocks (BLOOM-176B: 70)."""
    num_attention_heads: int = 4
    """Attention heads per block; must divide ``hidden_size`` (BLOOM-176B: 112)."""
    vocab_size: int = 4096
    """Real vocabulary size; the embedding is padded up to a multiple of ``vocab_pad_multiple``."""
    vocab_pad_multiple: int = 128
    """Padding granularity of the embedding (multiplied by the tensor-parallel size)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float | None = None
    """Std of the normal init; null means sqrt(1 / (3 * hidden_size)), which gives BLOOM-176B's 0.0048."""
    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in fp32 when training in bf16/fp16, as BLOOM did."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "vocab_pad_multiple"):
            require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.num_attention_heads={self.num_attention_heads} does not divide "
            f"model.hidden_size={self.hidden_size}; pick a head count that divides the hidden size",
        )
        require(
            self.init_std is None or self.init_std > 0,
            f"model.init_std must be positive or null, got {self.init_std}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(1.0 / (3.0 * self.hidden_size))

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        multiple = self.vocab_pad_multiple * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)
