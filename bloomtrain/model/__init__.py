"""The BLOOM model: a plain ``nn.Module`` (parallelism is applied from ``bloomtrain.parallel``)."""

from bloomtrain.model.bloom import Bloom, alibi_slopes, build_model, count_parameters

__all__ = ["Bloom", "alibi_slopes", "build_model", "count_parameters"]
