"""The ROOTS-style preprocessing pipeline: ``python -m data_tools.pipeline input.paths=[...] output.dir=DIR``.

``config.py`` (the keys), ``stages.py`` (what each stage does), ``run.py`` (local and SLURM executors,
completion markers), ``report.py`` (the report). The steps themselves live in ``data_tools/steps/``.
"""
