"""A packed fine-tuning step against a pretraining step at the same shape, side by side; and how full the
packed rows are on the worked example's data.

    .venv/bin/python benchmarks/finetune_throughput.py                    # bloom-tiny and 110M, fp32
    .venv/bin/python benchmarks/finetune_throughput.py --shapes tiny --rounds 7

The fine-tuning data is the worked example's (NusaX sentiment, 12 languages, ``data_tools.finetune
preset=nusax_sentiment``) tokenized with the bundled sample's tokenizer at each shape's sequence length.
Both steps are bloomtrain's training step as ``benchmarks/train_throughput.py --against`` times it (its
own process each, taking turns round by round): the pretraining one on the bundled sample, the
fine-tuning one on packed rows (segment ids, the block-diagonal mask, the weighted target loss, the
weights scaled per step). tokens/s counts every position of a row, padding included, for both: the same
work per step, so the ratio is the cost of the mask and the weighted loss. Packing efficiency (positions
holding an example) is measured for both packing methods at 128, 256 and 1024 positions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def prepare(out: Path, seq_length: int, tokenizer: str) -> Path:
    from data_tools.finetune.__main__ import main

    if main(["preset=nusax_sentiment", f"tokenizer.path={tokenizer}", f"output.dir={out}",
             f"seq_length={seq_length}"]) != 0:
        raise SystemExit("finetune_throughput: preparing the NusaX data failed (above)")
    return out / "blend.json"


def packing_efficiency(blend: Path, seq_length: int, method: str) -> tuple[float, int, int]:
    from bloomtrain.data.packing import PackedExamples, load_examples, read_finetune_blend

    finetune = read_finetune_blend(blend)
    examples, owners = load_examples(finetune, "train")
    rows = PackedExamples(examples, [s.weight for s in finetune.sources], owners, seq_length, 1, 1234, method)
    return rows.efficiency(), len(examples), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,110m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/bloomtrain", help="where the bundled sample is prepared")
    args = parser.parse_args()

    from train_throughput import SHAPES, run_pair

    from bloomtrain.data.blend import read_blend
    from data_tools.sample import prepare_sample

    cache = Path(args.cache_dir).expanduser()
    tokenizer = read_blend(prepare_sample(cache)).tokenizer
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    with tempfile.TemporaryDirectory() as scratch:
        print("packing efficiency on the worked example's training data (12 languages, one epoch):")
        for seq_length in (128, 256, 1024):
            blend = prepare(Path(scratch) / f"nusax-{seq_length}", seq_length, tokenizer)
            for method in ("best_fit", "greedy"):
                efficiency, examples, rows = packing_efficiency(blend, seq_length, method)
                print(f"  {seq_length:>5} positions, {method:<8}: {100 * efficiency:5.1f}% ({examples} examples "
                      f"in {rows} rows)", flush=True)
        for shape in args.shapes.split(","):
            seq_length = int(next(o for o in SHAPES[shape] if o.startswith("train.seq_length=")).split("=")[1])
            blend = Path(scratch) / f"nusax-{seq_length}" / "blend.json"
            if not blend.exists():
                blend = prepare(blend.parent, seq_length, tokenizer)
            result = run_pair(shape, "fp32", args.rounds, args.warmup, [f"data.cache_dir={cache}"], threads,
                              against=["data.kind=finetune", f"data.blend={blend}"])
            pretraining = statistics.median(result["bloomtrain_s"])
            finetuning = statistics.median(result["other_s"])
            tokens = result["tokens_per_step"]
            print(f"{shape} fp32 ({result['parameters'] / 1e6:.1f}M parameters, {tokens} positions per step, "
                  f"{threads} threads, median of {args.rounds} rounds of {result['steps_per_round']} steps):\n"
                  f"  pretraining step : {tokens / pretraining:,.0f} tokens/s\n"
                  f"  fine-tuning step : {tokens / finetuning:,.0f} tokens/s (packed rows, padding counted)\n"
                  f"  ratio            : {pretraining / finetuning:.3f} (fine-tuning / pretraining speed)",
                  flush=True)


if __name__ == "__main__":
    main()
