"""Run under torchrun by test_finetune_data.py: score rows of packed examples under a layout, as they are
and with one example's tokens changed, and each example alone; rank 0 writes the log-probabilities.

    torchrun --nproc_per_node N -m tests.packing_checks OUT.json key=value ...

The model is the run's freshly initialised one (no step is taken): what is checked is the attention, not
training.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

LENGTHS = (10, 17, 9, 20)  # four examples, 52 positions of a 64-position row


def packed(examples: list[torch.Tensor], width: int) -> tuple[torch.Tensor, ...]:
    tokens, labels, segments = (torch.zeros(width, dtype=torch.long) for _ in range(3))
    start, spans = 0, []
    for segment, example in enumerate(examples, 1):
        end = start + len(example) - 1
        tokens[start:end], labels[start:end], segments[start:end] = example[:-1], example[1:], segment
        spans.append((start, end))
        start = end
    return tokens, labels, segments, spans


def main() -> None:
    import torch.distributed as dist

    from bloomtrain.config_loader import load_config
    from bloomtrain.distributed import shutdown_distributed
    from bloomtrain.harness.scoring import EngineScorer
    from bloomtrain.train import build_trainer

    out = Path(sys.argv[1])
    trainer = build_trainer(load_config(sys.argv[2:]))
    config = trainer.config
    scorer = EngineScorer(trainer.engine, config.model.vocab_size, trainer.layout.sequence_parallel)
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(4, config.model.vocab_size, (n,), generator=generator) for n in LENGTHS]
    changed = list(examples)
    changed[1] = torch.randint(4, config.model.vocab_size, (LENGTHS[1],), generator=generator)
    width = config.train.seq_length
    rows = [packed(examples, width), packed(list(reversed(examples)), width)]  # a batch of two rows
    changed_rows = [packed(changed, width), packed(list(reversed(changed)), width)]

    def score(rows):
        tokens, labels, segments = (torch.stack([row[i] for row in rows]) for i in range(3))
        return scorer.score(tokens, labels, segments=segments).logprobs

    result = {"spans": [rows[0][3], rows[1][3]], "packed": score(rows).tolist(),
              "changed": score(changed_rows).tolist(),
              "unmasked": scorer.score(torch.stack([rows[0][0]]), torch.stack([rows[0][1]])).logprobs.tolist(),
              "alone": [scorer.score(example[:-1][None], example[1:][None]).logprobs[0].tolist()
                        for example in examples]}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    trainer.close()
    shutdown_distributed()


if __name__ == "__main__":
    main()
