"""How long a task took and the most memory its process held meanwhile, for the report's per-stage
throughput and peak memory (``report.json`` "stages")."""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set now (Linux), else its lifetime peak."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TaskMeter:
    """Context manager: wall seconds and the peak resident memory, sampled every ``interval`` seconds by a
    thread (the process's lifetime peak would include earlier tasks run by the same worker)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    def __enter__(self) -> TaskMeter:
        self.peak_bytes = resident_bytes()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, resident_bytes())
