"""The model is BLOOM exactly: ALiBi slopes, Hugging Face parity, published parameter counts, init."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.bloom import modeling_bloom

from bloomtrain.config import ModelConfig
from bloomtrain.config_loader import load_config
from bloomtrain.convert import from_hf
from bloomtrain.model import Bloom, KVCache, alibi_slopes, build_model, count_parameters


@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12, 16, 32, 112])
def test_alibi_slopes_match_transformers(heads):
    mask = torch.ones(1, 5)
    reference = modeling_bloom.build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]  # slope x position 1
    torch.testing.assert_close(alibi_slopes(heads), reference, rtol=0, atol=0)


def _random_hf_bloom(heads: int, hidden: int, vocab: int = 1000) -> transformers.BloomForCausalLM:
    torch.manual_seed(heads)
    # A large init spreads logits out, so the comparison is not trivially close to zero.
    config = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=3, n_head=heads,
                                      initializer_range=0.2)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a mis-mapped one would show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("heads,hidden", [(8, 64), (6, 48)])
def test_logits_equal_transformers(heads, hidden):
    hf_model = _random_hf_bloom(heads, hidden)
    input_ids = torch.randint(0, 1000, (2, 37))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        ours = from_hf(hf_model).eval()(input_ids)
    assert ours.shape == (2, 37, 1024)  # vocab padded to a multiple of 128
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(ours[..., :1000], expected, rtol=0, atol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward():
    model = from_hf(_random_hf_bloom(8, 64)).eval()
    input_ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache()
        pieces = [model(input_ids[:, :5], cache)] + [model(input_ids[:, i:i + 1], cache) for i in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


PUBLISHED = {"bloom-560m": 559e6, "bloom-1b1": 1.065e9, "bloom-1b7": 1.722e9, "bloom-3b": 3.003e9,
             "bloom-7b1": 7.069e9, "bloom-176b": 176.2e9}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_match_published(preset):
    config = load_config([f"model={preset}"]).model
    assert config.padded_vocab_size() == 250880
    assert count_parameters(config) == pytest.approx(PUBLISHED[preset], rel=0.005)


def test_build_on_meta_device_uses_no_memory():
    config = load_config(["model=bloom-176b"]).model
    with torch.device("meta"):
        model = Bloom(config)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.h) == 70


def test_init_follows_bloom():
    config = ModelConfig(hidden_size=192, num_layers=6, num_attention_heads=6, vocab_size=500)
    model = build_model(config, seed=0)
    std = math.sqrt(1 / (3 * 192))
    assert config.resolved_init_std == pytest.approx(std)
    assert ModelConfig(hidden_size=14336, num_attention_heads=112).resolved_init_std == pytest.approx(0.0048, abs=5e-5)
    block = model.h[0]
    assert block.self_attention.query_key_value.weight.std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * 6)
    assert block.self_attention.dense.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.all(block.mlp.dense_h_to_4h.bias == 0)
    assert torch.all(model.ln_f.weight == 1) and torch.all(model.word_embeddings_layernorm.bias == 0)
    assert model.word_embeddings.weight.shape == (512, 192)
    # the same seed gives the same weights
    again = build_model(config, seed=0)
    assert torch.equal(again.word_embeddings.weight, model.word_embeddings.weight)


def test_lm_head_is_tied_to_embedding():
    model = build_model(ModelConfig(), seed=0)
    assert not any("lm_head" in name for name, _ in model.named_parameters())
    ids = torch.randint(0, 4096, (1, 8))
    model(ids).sum().backward()
    assert model.word_embeddings.weight.grad is not None


def test_bf16_attention_softmax_runs_in_fp32():
    config = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=256)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_fp32 = model(ids).float()
        model.h[0].self_attention.softmax_in_fp32 = model.h[1].self_attention.softmax_in_fp32 = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bf16 = model(ids).float()
    assert torch.isfinite(in_fp32).all()
    error_fp32 = (in_fp32 - reference).abs().mean()
    error_bf16 = (in_bf16 - reference).abs().mean()
    assert error_fp32 < 0.05
    assert error_fp32 <= error_bf16


def test_causal_attention_ignores_the_future():
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=256), seed=0)
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])


def test_the_attention_bias_is_built_once_for_every_layer_and_step(monkeypatch):
    from bloomtrain.model import bloom

    built = []
    original = bloom.alibi_causal_bias
    monkeypatch.setattr(bloom, "alibi_causal_bias", lambda *args: built.append(args[1:]) or original(*args))
    monkeypatch.setattr(bloom, "ATTENTION_BIAS", bloom.SharedAttentionBias())
    model = build_model(ModelConfig(hidden_size=32, num_layers=3, num_attention_heads=4, vocab_size=64))
    tokens = torch.randint(0, 64, (2, 16))
    first = model(tokens)
    assert torch.equal(model(tokens), first) and len(built) == 1  # three layers, two steps: one bias
    model(tokens[:, :8])
    assert len(built) == 2 and built[-1][0] == 8  # a new length builds its own
    # A tensor-parallel rank holding other heads has other slopes: never handed another's bias.
    other = build_model(ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, vocab_size=64))
    attention = other.h[0].self_attention
    attention.alibi_slopes, attention.heads_key = attention.alibi_slopes[2:].clone(), (4, 2, 2)
    assert bloom.ATTENTION_BIAS.get(attention.heads_key, attention.alibi_slopes, 8, torch.float32, 8).shape[1] == 2
