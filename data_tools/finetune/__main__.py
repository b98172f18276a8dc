"""``python -m data_tools.finetune preset=nusax_sentiment tokenizer=RUN_OR_TOKENIZER output.dir=DIR``."""

from __future__ import annotations

import sys

from bloomtrain.config import ConfigError
from bloomtrain.console import route_library_notices
from data_tools.finetune.config import load_finetune_config
from data_tools.finetune.records import InputError


def main(argv: list[str] | None = None) -> int:
    route_library_notices()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_finetune_config(args)
        from data_tools.finetune.write import prepare, table

        report = prepare(config)
    except (ConfigError, InputError, FileNotFoundError, ValueError) as error:
        print(f"data_tools.finetune: {error}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"blend file: {config.output.dir}/blend.json (fine-tuning data); report: {config.output.dir}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
