"""Run under torchrun by test_parallel.py: train a few steps, then report per-rank facts as JSON.

    torchrun --nproc_per_node N -m tests.distributed_checks OUT_DIR key=value ...

Each rank writes OUT_DIR/rank_R.json with its coordinates, its parameter count, the numel of its
word-embedding shard, the sequence length its first block's LayerNorm saw (split under sequence
parallelism), how often that LayerNorm ran per micro-batch (twice with activation checkpointing: the
forward, then the recomputation in backward), the graphs torch.compile made (``train.compile``), and
whether every tensor-replicated parameter is bitwise equal across its tensor group after training.
The run's metrics.jsonl is written as by any run.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main() -> None:
    from megatron.core import parallel_state

    from bloomtrain.config_loader import load_config
    from bloomtrain.distributed import shutdown_distributed
    from bloomtrain.train import build_trainer

    out_dir = Path(sys.argv[1])
    trainer = build_trainer(load_config(sys.argv[2:]))
    norms = [m for name, m in trainer.engine.module.named_modules() if name.endswith("input_layernorm")]
    seen_lengths, calls = set(), []
    if norms:
        def seen(module, inputs, output):
            seen_lengths.add(inputs[0].shape[0])
            calls.append(1)

        norms[0].register_forward_hook(seen)
    trainer.train()
    train = trainer.config.train
    micro_batches = trainer.progress.step * train.global_batch_size // (train.micro_batch_size * trainer.layout.data)
    group = parallel_state.get_tensor_model_parallel_group()
    replicated = [p for p in trainer.engine.module.parameters() if getattr(p, "_bloomtrain_synced", False)]
    all_equal = True
    for param in replicated:
        gathered = [torch.empty_like(param.data) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, param.data.contiguous(), group=group)
        all_equal &= all(torch.equal(gathered[0], other) for other in gathered)
    embedding = sum(p.numel() for name, p in trainer.engine.module.named_parameters()
                    if "word_embeddings.weight" in name)
    report = {
        "tensor_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "data_rank": parallel_state.get_data_parallel_rank(),
        "local_parameters": trainer.engine.local_parameter_count(),
        "embedding_parameters": embedding,
        "replicated_tensors": len(replicated),
        "replicated_equal": bool(all_equal),
        "layernorm_seq_lengths": sorted(seen_lengths),
        "layernorm_calls_per_micro_batch": len(calls) / micro_batches,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank_{dist.get_rank()}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    main()
