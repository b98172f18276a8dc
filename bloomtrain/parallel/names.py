"""How each BLOOM parameter is named and split under every layout (pure functions, no torch).

- The plain model (pipeline 1) uses Hugging Face's names without ``transformer.``: ``h.0.mlp.dense_h_to_4h.weight``.
- The ``PipelineModule`` (pipeline > 1) is built from the layer table :func:`pipeline_layers`; a
  parameter is named by its layer's index in that table and the stage wrapper's attribute,
  ``2.block.mlp.dense_h_to_4h.weight``, and a tied layer's by its tie key,
  ``tied_modules.word_embeddings.word_embeddings.weight``.
- Over the tensor group, row-parallel weights are split along dim 1, replicated parameters not at
  all, everything else (column-parallel weights and biases, the vocab-parallel embedding) along dim 0.

The same table builds the pipeline's ``LayerSpec``s (``pipeline.py``) and maps names for export
(``checkpoint/weights.py``), universal checkpoints (``checkpoint/universal.py``) and weight loading
(``parallelize.py``), so a new kind of layer is added in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

REPLICATED_PARAMETER_PATTERNS = [
    r"^(.*\.)?(word_embeddings_layernorm|input_layernorm|post_attention_layernorm|ln_f|norm)\.(weight|bias)$",
    r"^.*(self_attention\.dense|mlp\.dense_4h_to_h)\.bias$",
]
ROW_PARALLEL_PARAMETER_PATTERNS = [r"^.*(self_attention\.dense|mlp\.dense_4h_to_h)\.weight$"]
TIED_MODULES = "tied_modules."  # DeepSpeed's prefix for modules shared between stages


def shard_dim(name: str) -> int | None:
    """The dimension along which parameter ``name`` is split over tensor ranks; None if replicated."""
    if any(re.match(pattern, name) for pattern in REPLICATED_PARAMETER_PATTERNS):
        return None
    return 1 if any(re.match(pattern, name) for pattern in ROW_PARALLEL_PARAMETER_PATTERNS) else 0


@dataclass(frozen=True)
class PipelineLayer:
    """One entry of the pipeline's layer list."""

    kind: str  # "embedding" | "embedding_norm" | "block" | "final_norm" | "head"
    plain_prefix: str  # the plain model's name for the module: "word_embeddings", "h.3", "ln_f"
    attribute: str  # the stage wrapper's attribute that holds it: "word_embeddings", "norm", "block"
    tie_key: str | None = None  # layers sharing a key share their weights (DeepSpeed's TiedLayerSpec)
    block_index: int | None = None

    @property
    def saved(self) -> bool:
        """Whether DeepSpeed writes a ``layer_NN`` file for it: the LM head reuses the embedding module
        through a forward function, so its weights are saved once, with the embedding."""
        return self.kind != "head"


@cache
def pipeline_layers(num_layers: int) -> tuple[PipelineLayer, ...]:
    """BLOOM as a pipeline: [embedding (tied), embedding LayerNorm, blocks, final LayerNorm, LM head (tied)]."""
    return (
        PipelineLayer("embedding", "word_embeddings", "word_embeddings", tie_key="word_embeddings"),
        PipelineLayer("embedding_norm", "word_embeddings_layernorm", "norm"),
        *(PipelineLayer("block", f"h.{index}", "block", block_index=index) for index in range(num_layers)),
        PipelineLayer("final_norm", "ln_f", "norm"),
        PipelineLayer("head", "word_embeddings", "word_embeddings", tie_key="word_embeddings"),
    )


def tied_prefixes() -> list[str]:
    """The name prefixes of the parameters shared between the first and the last stage."""
    return sorted({f"{TIED_MODULES}{layer.tie_key}." for layer in pipeline_layers(0) if layer.tie_key})


def is_pipeline_name(name: str) -> bool:
    """Whether ``name`` is a ``PipelineModule`` parameter name rather than a plain one."""
    return name.startswith(TIED_MODULES) or name.split(".", 1)[0].isdigit()


def plain_name_of_layer(index: int, key: str, num_layers: int) -> str:
    """The plain name of ``key`` (``attribute.rest``, as in layer ``index``'s state dict)."""
    layer = pipeline_layers(num_layers)[index]
    attribute, local = key.split(".", 1)
    assert attribute == layer.attribute, (index, key)
    return f"{layer.plain_prefix}.{local}"


def plain_name(pipeline_name: str, num_layers: int) -> str:
    """``2.block.mlp.dense_h_to_4h.weight`` -> ``h.0.mlp.dense_h_to_4h.weight``;
    ``tied_modules.word_embeddings.word_embeddings.weight`` -> ``word_embeddings.weight``."""
    if pipeline_name.startswith(TIED_MODULES):
        tie_key, key = pipeline_name.removeprefix(TIED_MODULES).split(".", 1)
        index = next(i for i, layer in enumerate(pipeline_layers(num_layers)) if layer.tie_key == tie_key)
    else:
        position, key = pipeline_name.split(".", 1)
        index = int(position)
    return plain_name_of_layer(index, key, num_layers)


def pipeline_names(num_layers: int, plain_names: list[str]) -> dict[str, str]:
    """Plain name -> the ``PipelineModule`` parameter name, for every plain name given."""
    by_prefix: dict[str, str] = {}
    for index, layer in enumerate(pipeline_layers(num_layers)):
        owner = f"{TIED_MODULES}{layer.tie_key}" if layer.tie_key else str(index)
        by_prefix.setdefault(layer.plain_prefix, f"{owner}.{layer.attribute}")
    result = {}
    for name in plain_names:
        prefix, local = name.rsplit(".", 1)
        while prefix not in by_prefix:  # "h.0.mlp.dense_h_to_4h" -> "h.0.mlp" -> "h.0"
            prefix, rest = prefix.rsplit(".", 1)
            local = f"{rest}.{local}"
        result[name] = f"{by_prefix[prefix]}.{local}"
    return result
