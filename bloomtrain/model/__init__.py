"""The BLOOM model: a plain ``nn.Module`` (parallelism is applied from ``bloomtrain.parallel``)."""

from bloomtrain.model.bloom import (
    Bloom,
    BloomBlock,
    KVCache,
    alibi_slopes,
    build_model,
    count_parameters,
    init_bloom_weights,
)

__all__ = ["Bloom", "BloomBlock", "KVCache", "alibi_slopes", "build_model", "count_parameters", "init_bloom_weights"]
