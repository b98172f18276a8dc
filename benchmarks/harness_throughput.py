"""bloomtrain's lm-eval model against lm-eval's own ``hf`` model: the same weights, task, documents, batch
size and machine, requests per second side by side.

    .venv/bin/python benchmarks/harness_throughput.py                       # 200 documents, 2 rounds
    .venv/bin/python benchmarks/harness_throughput.py --limit 400 --rounds 3 --hidden 512 --layers 8

A random BLOOM (``--hidden``, ``--layers``, a byte-level BPE of ``--vocab`` tokens trained on NusaX's
English sentences) is saved as a Hugging Face folder; both models load that folder, in fp32 on the CPU.
After a short warm-up of each, every round runs ``nusax_sentiment_eng`` (three log-likelihood requests
per document) and ``nusax_mt_eng_ind`` (greedy generation, ``--generate`` documents) through
``lm_eval.simple_evaluate`` for each model, the two taking turns to go first; a rate is the requests over
the seconds spent inside the model's request methods (tokenizing, batching, the forward passes; lm-eval's
own bookkeeping, the same for both, is left out), and the medians over rounds are compared.
The scores of the two are printed too: they must agree, or the comparison is of unlike work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_folder(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    import transformers

    from bloomtrain.harness.tasks.nusax import nusax
    from tests.conftest import save_byte_level_bpe

    texts = [row["text"] for split in ("train", "valid") for row in
             nusax._rows(nusax.DATA / "sentiment" / "english" / f"{split}.csv")]
    save_byte_level_bpe(texts, vocab, out)
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=hidden // 64,
                                      eos_token_id=2, bos_token_id=1, pad_token_id=3)
    transformers.BloomForCausalLM(config).save_pretrained(out)
    return out


def models(folder: Path, batch_size: int, max_length: int):
    from lm_eval.models.huggingface import HFLM

    from bloomtrain.checkpoint.loading import load_model
    from bloomtrain.harness.lm import BloomtrainLM
    from bloomtrain.harness.scoring import PlainScorer

    loaded = load_model(folder)
    ours = BloomtrainLM(PlainScorer(loaded.model, loaded.model.config.vocab_size), loaded.tokenizer, max_length,
                        batch_size, show_progress=False)
    theirs = HFLM(pretrained=str(folder), backend="causal", dtype="float32", device="cpu", batch_size=batch_size,
                  max_length=max_length, prefix_token_id=loaded.tokenizer.eos_id)
    return {"bloomtrain": ours, "lm-eval hf": theirs}


def timed(lm, task: str, limit: int) -> tuple[float, int, dict]:
    """Seconds spent inside the model's request methods (lm-eval's own bookkeeping, the same for both, left
    out), the number of requests, and the scores."""
    from bloomtrain.harness.suite import flat_scores, run_tasks

    spent: list = [0.0, 0]
    originals = {name: getattr(lm, name) for name in ("loglikelihood", "generate_until")}

    def timing(method):
        def call(requests, *args, **kwargs):
            started = time.perf_counter()
            try:
                answers = method(requests, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
                spent[1] += len(requests)
            if isinstance(answers[0], str):
                spent.append(sum(len(answer) for answer in answers) / len(answers))
            return answers
        return call

    for name, method in originals.items():
        setattr(lm, name, timing(method))
    try:
        results = run_tasks(lm, [task], limit=limit)
    finally:
        for name in originals:
            delattr(lm, name)
    scores = flat_scores(results)
    if len(spent) > 2:
        scores["mean characters generated"] = spent[2]
    return spent[0], spent[1], scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="sentiment documents (3 requests each)")
    parser.add_argument("--generate", type=int, default=20, help="translation documents (one generation each)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    from bloomtrain.console import route_library_notices

    route_library_notices()
    with tempfile.TemporaryDirectory() as tmp:
        lms = models(build_folder(Path(tmp) / "bloom", args.hidden, args.layers, args.vocab), args.batch_size, 256)
        for task, limit in (("nusax_sentiment_eng", args.limit), ("nusax_mt_eng_ind", args.generate)):
            rates: dict[str, list[float]] = {name: [] for name in lms}
            scores = {}
            for lm in lms.values():  # warm-up: first-call allocations and thread pools
                timed(lm, task, 4)
            for round_index in range(args.rounds):
                names = list(lms) if round_index % 2 == 0 else list(reversed(lms))  # take turns going first
                for name in names:
                    seconds, requests, scores[name] = timed(lms[name], task, limit)
                    rates[name].append(requests / seconds)
            medians = {name: statistics.median(values) for name, values in rates.items()}
            print(f"{task}: {requests} requests per round, batch {args.batch_size}, hidden {args.hidden}, "
                  f"{args.layers} layers, {args.rounds} rounds")
            for name, median in medians.items():
                print(f"  {name:12} {median:8.1f} requests/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})"
                      f"  scores {scores[name]}")
            print(f"  bloomtrain / lm-eval hf: {medians['bloomtrain'] / medians['lm-eval hf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
