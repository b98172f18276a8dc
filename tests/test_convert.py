"""Hugging Face conversion both ways, through the same functions and CLI users run."""

from __future__ import annotations

import subprocess
import sys

import torch
import transformers

from bloomtrain.checkpoint import latest_checkpoint, write_model_only_checkpoint
from bloomtrain.config import ModelConfig
from bloomtrain.convert import from_hf, to_hf
from bloomtrain.model import build_model


def test_to_hf_then_from_pretrained_round_trips(tmp_path):
    config = ModelConfig(hidden_size=48, num_layers=2, num_attention_heads=6, vocab_size=300, init_std=0.2)
    model = build_model(config, seed=3).eval()
    with torch.no_grad():
        model.ln_f.bias.normal_()
    write_model_only_checkpoint(tmp_path / "run" / "checkpoints", model, config)

    out = to_hf(tmp_path / "run", tmp_path / "hf")  # a run directory resolves to its latest checkpoint
    hf_model = transformers.BloomForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.vocab_size == 300
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        expected = model(ids)[..., :300]
        torch.testing.assert_close(hf_model(ids).logits, expected, rtol=0, atol=1e-5)
        # Hugging Face stores only the real vocabulary rows; the padding rows come back as zeros.
        back = from_hf(out).eval()
        torch.testing.assert_close(back(ids)[..., :300], expected, rtol=0, atol=0)


def test_cli_from_hf_then_to_hf(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.BloomConfig(vocab_size=256, hidden_size=32, n_layer=2, n_head=4)
    hf_model = transformers.BloomForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")

    run = [sys.executable, "-m", "bloomtrain.convert"]
    subprocess.run([*run, "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")], check=True, timeout=120)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_0"
    subprocess.run([*run, "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2")], check=True, timeout=120)

    again = transformers.BloomForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf_model(ids).logits, rtol=0, atol=1e-6)


def test_cli_missing_source_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bloomtrain.convert", "to-hf", str(tmp_path / "nope"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no bloomtrain checkpoint" in result.stderr and "Traceback" not in result.stderr
