"""How each BLOOM parameter is named and split under every layout (pure functions, no torch).

- The plain model (pipeline 1) uses Hugging Face's names without ``transformer.``: ``h.0.mlp.dense_h_to_4h.weight``.
- The ``PipelineModule`` (pipeline > 1) names parameters by global layer index in its spec list,
  ``[embedding, embedding LayerNorm, block 0..L-1, final LayerNorm, LM head]``, plus the wrapper's
  attribute: ``2.block.mlp.dense_h_to_4h.weight``; the tied embedding is
  ``tied_modules.word_embeddings.word_embeddings.weight``.
- Over the tensor group, row-parallel weights are split along dim 1, replicated parameters not at
  all, everything else (column-parallel weights and biases, the vocab-parallel embedding) along dim 0.

Checkpoint conversion (universal checkpoints, export) reads these to merge or re-split shards.
"""

from __future__ import annotations

import re

REPLICATED_PARAMETER_PATTERNS = [
    r"^(.*\.)?(word_embeddings_layernorm|input_layernorm|post_attention_layernorm|ln_f|norm)\.(weight|bias)$",
    r"^.*(self_attention\.dense|mlp\.dense_4h_to_h)\.bias$",
]
ROW_PARALLEL_PARAMETER_PATTERNS = [r"^.*(self_attention\.dense|mlp\.dense_4h_to_h)\.weight$"]


def shard_dim(name: str) -> int | None:
    """The dimension along which parameter ``name`` is split over tensor ranks; None if replicated."""
    if any(re.match(pattern, name) for pattern in REPLICATED_PARAMETER_PATTERNS):
        return None
    return 1 if any(re.match(pattern, name) for pattern in ROW_PARALLEL_PARAMETER_PATTERNS) else 0


TIED_EMBEDDING_PREFIX = "tied_modules.word_embeddings."


def plain_name_of_layer(index: int, key: str, num_layers: int) -> str:
    """The plain ``Bloom`` name of parameter ``key`` of pipeline layer ``index`` (see the module docstring)."""
    if index == 0:
        return key  # word_embeddings.weight
    local = key.split(".", 1)[1]  # drop the stage wrapper's attribute (norm., block.)
    if index == 1:
        return "word_embeddings_layernorm." + local
    if index == num_layers + 2:
        return "ln_f." + local
    return f"h.{index - 2}." + local


def plain_name(pipeline_name: str, num_layers: int) -> str:
    """``2.block.mlp.dense_h_to_4h.weight`` -> ``h.0.mlp.dense_h_to_4h.weight`` (the tied embedding too)."""
    if pipeline_name.startswith(TIED_EMBEDDING_PREFIX):
        return pipeline_name.removeprefix(TIED_EMBEDDING_PREFIX)
    index, key = pipeline_name.split(".", 1)
    return plain_name_of_layer(int(index), key, num_layers)


def pipeline_names(num_layers: int, plain_names: list[str]) -> dict[str, str]:
    """Plain name -> the ``PipelineModule`` parameter name, for every plain name given."""
    result = {}
    for name in plain_names:
        if name == "word_embeddings.weight":
            result[name] = TIED_EMBEDDING_PREFIX + name
        elif name.startswith("word_embeddings_layernorm."):
            result[name] = "1.norm." + name.split(".", 1)[1]
        elif name.startswith("ln_f."):
            result[name] = f"{num_layers + 2}.norm." + name.split(".", 1)[1]
        else:
            _, index, local = name.split(".", 2)
            result[name] = f"{int(index) + 2}.block.{local}"
    return result
