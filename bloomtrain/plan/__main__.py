"""``python -m bloomtrain.plan [key=value ...]``: the plan of a config, or with ``launch.suggest=true``
the layouts that fit ``launch.nodes`` x ``launch.slurm.gpus_per_node`` GPUs of ``launch.gpu``."""

from __future__ import annotations

import sys

from bloomtrain.config import BloomTrainConfig, ConfigError
from bloomtrain.config_loader import load_config
from bloomtrain.console import route_library_notices
from bloomtrain.parallel.layout import process_count, resolve_layout
from bloomtrain.plan.estimate import layout_of, plan_of
from bloomtrain.plan.memory import GIB
from bloomtrain.plan.suggest import suggest


def main(argv: list[str] | None = None) -> int:
    route_library_notices()
    try:
        config = load_config(list(sys.argv[1:] if argv is None else argv))
        if config.launch.suggest:
            return _print_suggestions(config)
        layout = resolve_layout(config, process_count(config))
        print(plan_of(config, layout_of(config, layout.data)).table())
    except ConfigError as error:
        print(f"bloomtrain.plan: config error: {error}", file=sys.stderr)
        return 2
    return 0


def _print_suggestions(config: BloomTrainConfig) -> int:
    launch = config.launch
    plans, considered = suggest(config, top=0)
    world = launch.nodes * (launch.slurm.gpus_per_node or 8)
    if not plans:
        print(f"bloomtrain.plan: none of {considered} layouts of {world} x {launch.gpu} fits {config.model.name}; "
              "add nodes, lower train.micro_batch_size or train.seq_length", file=sys.stderr)
        return 1
    print(f"{len(plans)} of {considered} layouts of {world} x {launch.gpu} fit {config.model.name}; the fastest "
          f"by estimated step time at {launch.assumed_mfu:.0%} MFU:")
    for rank, plan in enumerate(plans[:launch.suggest_top], start=1):
        print(f"{rank:>3}. {plan.layout.describe():<32} {plan.memory.total / GIB:6.1f} GiB  "
              f"{plan.step.total:7.2f} s/step  {plan.days:7.1f} days")
    best = plans[0]
    print(f"\nwhy {best.layout.describe()}:\n{best.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
