"""Convert between bloomtrain checkpoints and Hugging Face ``BloomForCausalLM`` directories.

    python -m bloomtrain.convert to-hf RUN_OR_CHECKPOINT_DIR HF_DIR
    python -m bloomtrain.convert from-hf HF_DIR CHECKPOINT_DIR

The conversion itself is ``bloomtrain/checkpoint/hf.py``; ``from_hf`` and ``to_hf`` are importable from
here too (``from bloomtrain.convert import from_hf``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from bloomtrain.checkpoint.hf import from_hf, from_hf_to_checkpoint, to_hf
from bloomtrain.console import route_library_notices

__all__ = ["from_hf", "from_hf_to_checkpoint", "main", "to_hf"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomtrain.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf_parser = commands.add_parser("to-hf", help="bloomtrain checkpoint (or run dir) -> Hugging Face dir")
    from_hf_parser = commands.add_parser("from-hf", help="Hugging Face dir -> bloomtrain checkpoint dir")
    for sub in (to_hf_parser, from_hf_parser):
        sub.add_argument("src")
        sub.add_argument("dst")
    args = parser.parse_args(argv)
    route_library_notices()
    logging.basicConfig(level=logging.WARNING, format="bloomtrain.convert: %(message)s")
    try:
        if args.command == "to-hf":
            written = to_hf(args.src, args.dst)
        else:
            written = from_hf_to_checkpoint(args.src, args.dst)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"bloomtrain.convert: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
