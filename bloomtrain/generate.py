"""Text from a run, a checkpoint or a Hugging Face BLOOM directory, greedy or sampled, with a KV cache.

    python -m bloomtrain.generate RUN_CHECKPOINT_OR_HF_DIR --prompt "The rights of" [--max-new-tokens 40]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 1]

Greedy by default (``--temperature 0``): token for token what ``transformers``' ``generate`` gives on the
same weights. Sampling draws from the temperature-scaled distribution restricted to the ``top-k`` most
likely tokens and the smallest set whose probability reaches ``top-p``, from a seeded generator. Only the
tokenizer's real vocabulary is ever produced (never a padding row); generation stops at the tokenizer's
end-of-document token. One process, fp32, on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bloomtrain.checkpoint.loading import load_model
from bloomtrain.checkpoint.store import CheckpointError
from bloomtrain.console import route_library_notices
from bloomtrain.data.tokenizer import TokenEncoder
from bloomtrain.model import Bloom, KVCache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0


def load(path: str | Path) -> tuple[Bloom, TokenEncoder]:
    """The plain model at ``path`` (run, checkpoint of any layout, or Hugging Face directory) and its tokenizer."""
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer


@torch.no_grad()
def generate(model: Bloom, prompt_ids: list[int], sampling: Sampling, eos_id: int | None = None,
             vocab_size: int | None = None) -> list[int]:
    """The new token ids after ``prompt_ids`` (not including them), up to ``max_new_tokens`` or ``eos_id``."""
    model.eval()
    device = next(model.parameters()).device
    vocab_size = vocab_size or model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache()
    step_input = torch.tensor([prompt_ids], device=device)
    produced: list[int] = []
    for _ in range(sampling.max_new_tokens):
        logits = model(step_input, cache)[0, -1, :vocab_size].float()
        token = int(_choose(logits, sampling, generator))
        produced.append(token)
        if token == eos_id:
            break
        step_input = torch.tensor([[token]], device=device)
    return produced


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.temperature <= 0:
        return logits.argmax()
    logits = logits / sampling.temperature
    if sampling.top_k:
        threshold = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        dropped = cumulative - torch.softmax(ordered, dim=-1) >= sampling.top_p  # keep the first that reaches p
        logits = logits.scatter(0, order[dropped], float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomtrain.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, a checkpoint, or a Hugging Face BLOOM directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    route_library_notices()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        print("bloomtrain.generate: --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and "
              "--top-p in (0, 1] are required", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load(args.path)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"bloomtrain.generate: {error}", file=sys.stderr)
        return 2
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    new = generate(model, tokenizer.encode([args.prompt])[0], sampling, tokenizer.eos_id, tokenizer.vocab_size)
    print(args.prompt + tokenizer.decode([token for token in new if token != tokenizer.eos_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
