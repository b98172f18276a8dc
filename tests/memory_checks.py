"""Run under torchrun by test_plan.py: build a run's engine, train a few steps, and report the bytes this
rank really holds in model weights and in the optimizer's state, beside the plan's estimate.

    torchrun --nproc_per_node N -m tests.memory_checks OUT_DIR key=value ...

The optimizer's state is read from the optimizer DeepSpeed steps (``engine.basic_optimizer``): Adam's
moments, and its parameters wherever they are not the model's own (the fp32 master copy that ZeRO and
half precision keep), with their gradients when they are kept.
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _planned_bucket(config, held: int) -> int:
    from bloomtrain.parallel.layout import gradient_bucket_elements

    if config.parallel.zero_stage not in (1, 2):
        return 0
    return gradient_bucket_elements(held)


def main() -> None:
    from megatron.core import parallel_state

    from bloomtrain.config_loader import load_config
    from bloomtrain.distributed import shutdown_distributed
    from bloomtrain.plan import layout_of, plan_of, stage_parameters, state_bytes_per_parameter
    from bloomtrain.train import build_trainer

    out_dir = Path(sys.argv[1])
    config = load_config(sys.argv[2:])
    import psutil

    before = psutil.Process().memory_info().rss  # the libraries are imported; nothing of the run exists yet
    trainer = build_trainer(config)
    trainer.train()
    engine = trainer.engine.engine
    model_params = list(engine.module.parameters())
    own = {id(p) for p in model_params}
    basic = engine.basic_optimizer
    moments = [value for state in basic.state.values() for value in state.values()
               if hasattr(value, "numel") and value.numel() > 1]
    masters = [p for group in basic.param_groups for p in group["params"] if id(p) not in own]
    bucket_elements = getattr(trainer.engine.optimizer, "reduce_bucket_size", 0)  # ZeRO 1/2's gradient bucket
    stage = parallel_state.get_pipeline_model_parallel_rank()
    layout = trainer.layout
    held = stage_parameters(config.model, layout.tensor, layout.pipeline)[stage]
    weight, gradient, optimizer = state_bytes_per_parameter(config.train.precision, layout.zero_stage, layout.data)
    # The report is read by tests/test_plan.py; the bytes are this rank's.
    plan = plan_of(config, layout_of(config, layout.data))
    report = {
        "rank": dist.get_rank(), "stage": stage, "held_parameters": held,
        "local_parameters": sum(p.numel() for p in model_params),
        "weights": _bytes(model_params), "moments": _bytes(moments), "masters": _bytes(masters),
        "master_gradients": _bytes(p.grad for p in masters if p.grad is not None),
        "estimated_weights": held * weight, "estimated_optimizer": held * optimizer,
        "estimated_gradients": held * gradient, "estimated_activations": plan.memory.activations,
        "gradient_bucket": bucket_elements, "planned_bucket": _planned_bucket(config, held),
        "estimated_total": plan.memory.total,
        "peak_rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank_{dist.get_rank()}.json").write_text(json.dumps(report))
    trainer.close()
    shutdown_distributed()


if __name__ == "__main__":
    main()
