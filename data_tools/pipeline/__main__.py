"""``python -m data_tools.pipeline input.paths='[raw/*.jsonl.gz]' output.dir=data/roots [executor=slurm]``."""

from __future__ import annotations

import sys

from bloomtrain.config import ConfigError
from bloomtrain.console import route_library_notices
from data_tools.pipeline.config import load_pipeline_config
from data_tools.pipeline.stages import TaskFailed
from data_tools.steps.read import InputError


def main(argv: list[str] | None = None) -> int:
    route_library_notices()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_pipeline_config(args)
        from data_tools.pipeline.run import run_pipeline

        shards = run_pipeline(config)
    except (ConfigError, InputError) as error:
        print(f"data_tools.pipeline: {error}", file=sys.stderr)
        return 2
    except TaskFailed as error:
        print(f"data_tools.pipeline: {error}", file=sys.stderr)
        return 1
    if config.executor.name == "slurm" and not config.executor.wait:
        return 0  # the jobs run on; the last one writes the report
    from data_tools.pipeline.report import table, write_report

    report = write_report(config, len(shards))
    print(table(report))
    print(f"blend file: {config.output.dir}/blend.json (train with data.blend=...); "
          f"report: {config.output.dir}/report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
