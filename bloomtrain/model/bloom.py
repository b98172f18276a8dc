"""The BLOOM decoder as a plain ``nn.Module`` — no distributed code here.

Architecture (BigScience, "BLOOM: A 176B-Parameter Open-Access Multilingual Language Model"):
word embedding -> LayerNorm -> N pre-LN blocks [LN -> attention with ALiBi -> residual,
LN -> tanh-GeLU 4h MLP -> residual] -> final LayerNorm -> LM head tied to the embedding.

Parameter names mirror ``transformers``' ``BloomModel`` (without its ``transformer.`` prefix) so
that conversion is a rename. Tensor and pipeline parallelism are applied to this module from
``bloomtrain/parallel/`` afterwards; the attention keeps its ALiBi slopes in a buffer so a
tensor-parallel wrapper can slice them per rank.

Activations between layers are sequence-first, [seq, batch, hidden], as in Megatron: sequence
parallelism splits them along dim 0 without a transpose. Token ids come in and logits go out
batch-first; the logits are a transposed view of the sequence-first product, so no copy is made.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from bloomtrain.config import ModelConfig


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes, including head counts that are not powers of two (fp32, shape [heads])."""
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), dtype=torch.float32)
    powers = torch.arange(1, 1 + closest_power_of_2, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    if closest_power_of_2 != num_heads:
        # Remaining heads interleave the slopes of the next power of two, as in the ALiBi paper.
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), dtype=torch.float32)
        num_remaining = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return slopes


def alibi_causal_bias(slopes: torch.Tensor, seq_length: int, dtype: torch.dtype,
                      key_length: int | None = None) -> torch.Tensor:
    """Additive attention bias [1, heads, seq, keys]: ALiBi (slope x key position) plus the causal mask.

    The queries are the last ``seq_length`` of ``key_length`` positions (all of them without a KV cache).
    Using the key position rather than (key - query) distance is BLOOM's choice: the two differ by a
    per-row constant, which softmax ignores.
    """
    key_length = key_length or seq_length
    positions = torch.arange(key_length, device=slopes.device, dtype=torch.float32)
    bias = slopes.float()[:, None, None] * positions[None, None, :]
    causal = torch.ones(seq_length, key_length, device=slopes.device, dtype=torch.bool).triu(
        1 + key_length - seq_length)
    bias = bias.masked_fill(causal, float("-inf"))
    return bias.unsqueeze(0).to(dtype)


class SharedAttentionBias:
    """The newest ALiBi + causal bias, reused by every layer and every step that asks for the same one.

    Building it is a [heads, seq, keys] fill per call (about 3% of a 110M CPU step when each layer built
    its own). The bias is a pure function of which of the model's heads a rank holds, the lengths and the
    dtype, so that is the key: no device value is read, and the layers of a rank (whose slopes are equal)
    share one tensor. One entry is kept, so generation, whose key length grows, replaces it each token.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.bias: torch.Tensor | None = None

    def get(self, heads_key: tuple, slopes: torch.Tensor, seq_length: int, dtype: torch.dtype,
            key_length: int) -> torch.Tensor:
        key = (heads_key, seq_length, key_length, dtype, slopes.device)
        if key != self.key:
            self.key, self.bias = key, alibi_causal_bias(slopes, seq_length, dtype, key_length)
        return self.bias


ATTENTION_BIAS = SharedAttentionBias()


class KVCache:
    """Each layer's keys and values of the positions seen so far, for generating one token at a time."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's [batch, heads, seq, dim] keys and values; return all of them so far."""
        if layer in self.layers:
            past_key, past_value = self.layers[layer]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.layers[layer] = (key, value)
        return key, value


class BloomAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.softmax_in_fp32 = config.attention_softmax_in_fp32
        # Per head, the fused projection holds [q, k, v] (BLOOM's layout): [heads, 3, head_dim].
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads), persistent=False)
        # (the model's heads, the first one held here, how many): which slopes the buffer holds. A
        # tensor-parallel rank holds a slice and says so (parallel/tensor_parallel.py).
        self.heads_key = (self.num_heads, 0, self.num_heads)

    def forward(self, hidden: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        fused = self.query_key_value(hidden)
        # Under sequence parallelism the input holds a slice of the sequence and the projection
        # gathers the rest, so the shape is read from its output.
        seq, batch, _ = fused.shape
        # The head count comes from the slopes, so a tensor-parallel copy holding a slice of the heads
        # runs this same code.
        local_heads = self.alibi_slopes.numel()
        fused = fused.view(seq, batch, local_heads, 3, self.head_dim)
        query, key, value = (fused[..., i, :].permute(1, 2, 0, 3) for i in range(3))  # [batch, heads, seq, dim]

        compute_dtype = query.dtype
        if self.softmax_in_fp32 and compute_dtype in (torch.float16, torch.bfloat16):
            query, key, value = query.float(), key.float(), value.float()
        if cache is not None:
            key, value = cache.extend(layer, key, value)
        bias = ATTENTION_BIAS.get(self.heads_key, self.alibi_slopes, seq, query.dtype, key.shape[2])
        if allowed is not None:
            # The finite minimum (not -inf): a query no key is allowed for (a left-padded position) then
            # averages what it sees instead of producing NaN; an allowed key outweighs it entirely.
            bias = bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        context = context.to(compute_dtype).permute(2, 0, 1, 3).reshape(seq, batch, local_heads * self.head_dim)
        return self.dense(context)


class BloomMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)

    def forward(self, hidden: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), cache, layer, allowed)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Bloom(nn.Module):
    """BLOOM causal LM: ``model(input_ids)`` returns logits [batch, seq, padded_vocab].

    With a :class:`KVCache`, ``input_ids`` are the positions after those the cache holds (generation).
    ``padding`` ([batch, keys] bool, True where a row is left-padded, the cached positions included) lets
    prompts of different lengths be generated from together; ``segments`` ([batch, seq] int, which packed
    example each position belongs to) keeps every example to itself (:func:`attention_allowed`).
    """

    def __init__(self, config: ModelConfig, padded_vocab_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.padded_vocab_size = padded_vocab_size or config.padded_vocab_size()
        self.word_embeddings = nn.Embedding(self.padded_vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, padding: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids.t()))  # [seq, batch, hidden]
        allowed = attention_allowed(padding, segments)
        for layer, block in enumerate(self.h):
            hidden = block(hidden) if cache is None and allowed is None else block(hidden, cache, layer, allowed)
        return F.linear(self.ln_f(hidden), self.word_embeddings.weight).transpose(0, 1)

    def init_weights(self, seed: int = 0) -> None:
        """BLOOM's init (see :func:`init_bloom_weights`); also rebuilds buffers after a meta-device build."""
        init_bloom_weights(self, self.config, seed)


def attention_allowed(padding: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which keys each query may see beyond the causal mask, [batch, 1, queries or 1, keys] bool; None: all.

    Left padding ([batch, keys], True where padded): no query sees a padded key. Packed examples
    ([batch, seq] segment ids): a query sees only its own example's keys, a block-diagonal mask. ALiBi
    needs neither a position shift nor a reset: moving a row's or an example's positions adds the same
    amount to all of a query's allowed scores, which softmax ignores.
    """
    if segments is not None:
        return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)
    if padding is not None:
        return ~padding[:, None, None, :]
    return None


@torch.no_grad()
def init_bloom_weights(module: nn.Module, config: ModelConfig, seed: int, prefix: str = "") -> None:
    """normal(0, std) weights, output projections scaled by 1/sqrt(2 x layers), zero biases, unit norms.

    Each sub-module draws from its own generator, seeded by ``seed`` and its name in the full model
    (``prefix`` + its name here, e.g. ``h.3.mlp.dense_h_to_4h``). A pipeline stage or a tensor-parallel
    shard that builds only part of the model therefore gets exactly the weights the whole model has.
    """
    std = config.resolved_init_std
    output_std = std / math.sqrt(2.0 * config.num_layers)
    for name, sub in module.named_modules():
        full_name = ".".join(part for part in (prefix, name) if part)
        generator = torch.Generator(device="cpu").manual_seed(_module_seed(seed, full_name))
        if isinstance(sub, nn.Linear):
            is_output = full_name.endswith("self_attention.dense") or full_name.endswith("mlp.dense_4h_to_h")
            _normal_(sub.weight, output_std if is_output else std, generator)
            sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            _normal_(sub.weight, std, generator)
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
        elif isinstance(sub, BloomAttention):
            sub.alibi_slopes = alibi_slopes(sub.num_heads).to(sub.query_key_value.weight.device)


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    # Draw on the CPU with an explicit generator so the init is the same on every device and rank.
    tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator))


def build_model(config: ModelConfig, device: torch.device | str = "cpu", seed: int = 0,
                padded_vocab_size: int | None = None) -> Bloom:
    """Build on the meta device (no memory), then materialise on ``device`` and initialise."""
    with torch.device("meta"):
        model = Bloom(config, padded_vocab_size)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_parameters(config: ModelConfig) -> int:
    """Parameter count of a config, computed on the meta device (works for BLOOM-176B on a laptop)."""
    with torch.device("meta"):
        model = Bloom(config)
    return sum(p.numel() for p in model.parameters())
