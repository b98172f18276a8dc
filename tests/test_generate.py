"""Generation with a KV cache: greedy equals transformers' generate; sampling is seeded and stays in the vocabulary."""

from __future__ import annotations

import subprocess
import sys

import torch
import transformers

from bloomtrain.convert import from_hf
from bloomtrain.generate import Sampling, generate
from tests.conftest import REPO, save_byte_level_bpe


def _hf_bloom(vocab_size: int = 500) -> transformers.BloomForCausalLM:
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=vocab_size, hidden_size=64, n_layer=3, n_head=8,
                                      initializer_range=0.2)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial biases and norms: varied continuations, not one token repeated
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model


def test_greedy_generation_equals_transformers():
    hf_model = _hf_bloom()
    hf_model.generation_config.eos_token_id = None  # run the full length on both sides
    model = from_hf(hf_model)
    outputs = set()
    for prompt in ([5, 17, 99, 3, 250, 42, 7], [400, 1], [9] * 12):
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
        ours = generate(model, prompt, Sampling(max_new_tokens=30))
        assert ours == expected, prompt
        outputs.add(tuple(ours))
    assert len(outputs) == 3  # the prompts lead to different continuations: the comparison is not trivial


def test_sampling_is_seeded_and_never_produces_padding_rows():
    model = from_hf(_hf_bloom(vocab_size=300))  # padded to 384 rows
    prompt = [1, 2, 3]
    sampled = generate(model, prompt, Sampling(max_new_tokens=40, temperature=1.5, seed=7))
    assert sampled == generate(model, prompt, Sampling(max_new_tokens=40, temperature=1.5, seed=7))
    assert sampled != generate(model, prompt, Sampling(max_new_tokens=40, temperature=1.5, seed=8))
    assert all(0 <= token < 300 for token in sampled)
    # top-k 1 and a tiny top-p both leave only the most likely token: greedy.
    greedy = generate(model, prompt, Sampling(max_new_tokens=15))
    assert generate(model, prompt, Sampling(max_new_tokens=15, temperature=1.0, top_k=1, seed=3)) == greedy
    assert generate(model, prompt, Sampling(max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=3)) == greedy


def test_cli_generates_from_a_hugging_face_folder(tmp_path):
    folder = tmp_path / "hf"
    save_byte_level_bpe(["the rights of every person are equal"] * 20, 300, folder)
    vocab_size = transformers.AutoTokenizer.from_pretrained(folder).vocab_size
    _hf_bloom(vocab_size=vocab_size).save_pretrained(folder)
    result = subprocess.run([sys.executable, "-m", "bloomtrain.generate", str(folder), "--prompt", "the rights",
                             "--max-new-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the rights") and len(result.stdout.strip()) > len("the rights")
    bad = subprocess.run([sys.executable, "-m", "bloomtrain.generate", str(tmp_path / "nope"), "--prompt", "x"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
