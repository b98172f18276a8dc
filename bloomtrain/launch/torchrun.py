"""torchrun, with its failures reported in one line: ``python -m bloomtrain.launch.torchrun [torchrun args]``.

torchrun ends a failed run with a Python traceback of its own (``ChildFailedError``) and exit status
1 whatever its ranks returned. This wrapper runs the same ``torch.distributed.run`` and instead
prints which ranks failed and how, and exits with the first failed rank's status, so 3 (diverged,
``bloomtrain/health.py``) and 75 (stopped with a checkpoint, ``bloomtrain/preemption.py``) reach
the launcher and a job script unchanged.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def describe(failure) -> str:
    if failure.exitcode < 0:
        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    return f"exit status {failure.exitcode}"


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun.run(torchrun.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as error:
        ranks = ", ".join(f"rank {rank} ({describe(failure)})" for rank, failure in sorted(error.failures.items()))
        print(f"bloomtrain: {ranks}; each rank's own message is above", file=sys.stderr, flush=True)
        status = error.get_first_failure()[1].exitcode
        return status if status > 0 else 1
    except SignalException as error:
        # torchrun was told to stop and stopped its ranks; the launcher reads their stop record.
        print(f"bloomtrain: torchrun stopped by {error.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
