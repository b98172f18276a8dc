"""BLOOM's attention two ways, side by side: the model's (SDPA with the ALiBi + causal bias as a mask)
against ALiBi folded into one extra query/key dimension, which lets SDPA run ``is_causal=True``.

    .venv/bin/python benchmarks/attention_alibi.py                 # bloom-tiny's and the 110m shape, fp32
    .venv/bin/python benchmarks/attention_alibi.py --rounds 7 --seconds 3

Why the fold is exact: BLOOM adds ``slope_h x key_position`` to every score. Appending ``slope_h / scale``
to each query and ``key_position`` to each key (padded with zeros to a multiple of 8) adds exactly that
term to ``q . k x scale``. With no mask tensor, SDPA may take its causal kernels, which skip the blocks
above the diagonal (about half the work at long sequences) and, on GPUs, are the flash kernels an
arbitrary mask rules out. The cost is the copies into the wider heads and the wider head itself.

This measures the attention alone (forward and backward of ``[batch, heads, seq, head_dim]`` inputs);
the model does not use the fold (no gain measured on CPU; docs/benchmarks.md, issue 16). Each variant
runs rounds of about ``--seconds``, taking turns, and the medians are compared.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloomtrain.model.bloom import ATTENTION_BIAS, alibi_slopes  # noqa: E402

SHAPES = {"tiny": (8, 4, 128, 32), "110m": (2, 12, 1024, 64)}  # batch, heads, seq, head_dim


def masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """As the model computes it: SDPA with the ALiBi + causal bias as the mask. The model builds that bias
    once for all layers and steps (``ATTENTION_BIAS``), so it is not timed here either."""
    bias = ATTENTION_BIAS.get(("benchmark", slopes.numel()), slopes, query.shape[2], query.dtype, key.shape[2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)


def folded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
           pad: int = 8) -> torch.Tensor:
    """ALiBi as one more dimension of the queries and keys; SDPA's causal path, no mask tensor."""
    batch, heads, seq, head_dim = query.shape
    scale = 1.0 / math.sqrt(head_dim)
    query_extra = query.new_zeros(batch, heads, seq, pad)
    query_extra[..., 0] = (slopes.to(query.dtype) / scale).view(1, heads, 1)
    key_extra = key.new_zeros(batch, heads, seq, pad)
    key_extra[..., 0] = torch.arange(seq, dtype=key.dtype)
    # The values are widened too: the CPU's flash kernel wants one head size for all three.
    value = torch.cat([value, value.new_zeros(batch, heads, seq, pad)], -1)
    context = F.scaled_dot_product_attention(torch.cat([query, query_extra], -1), torch.cat([key, key_extra], -1),
                                             value, is_causal=True, scale=scale)
    return context[..., :head_dim]


def _round(attention, inputs: list[torch.Tensor], slopes: torch.Tensor, seconds: float) -> float:
    """Seconds per forward + backward over a round of about ``seconds``."""
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        attention(*inputs, slopes).sum().backward()
        steps += 1
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,110m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each round")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shape(s) {sorted(unknown)}; choose from {sorted(SHAPES)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward + backward")
    print("| shape (batch, heads, seq, head_dim) | masked ms | folded ms | folded speed-up | max difference |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, heads, seq, head_dim = SHAPES[shape]
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randn(batch, heads, seq, head_dim, generator=generator, requires_grad=True)
                  for _ in range(3)]
        slopes = alibi_slopes(heads)
        with torch.no_grad():
            difference = (masked(*inputs, slopes) - folded(*inputs, slopes)).abs().max().item()
        times = {"masked": [], "folded": []}
        for round_index in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, attention in (("masked", masked), ("folded", folded)):
                seconds = _round(attention, inputs, slopes, args.seconds)
                if round_index:
                    times[name].append(seconds)
        ours, theirs = statistics.median(times["masked"]), statistics.median(times["folded"])
        print(f"| {shape} {SHAPES[shape]} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {ours / theirs:.2f}x | "
              f"{difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
