"""What reaches the terminal, decided in one place.

bloomtrain's own lines, the progress line and real problems (any warning or error not listed below)
stay on the terminal. Notices from the libraries that say nothing a user can act on go to the run's
log instead (``RUN_DIR/logs/rank-R.log``), or nowhere for commands without a run directory:

- DeepSpeed's "Setting accelerator to CPU" on a machine without CUDA, and its line saying it built its
  CPU communication op;
- megatron-core's notice that Transformer Engine and Apex are not installed (bloomtrain uses its plain
  PyTorch layers; Transformer Engine is an optional speed-up on GPUs);
- lm-eval's hint, for every task that reads its data through a function (the shipped suites do), that
  such functions take keyword arguments from ``--metadata``;
- deprecation warnings about APIs that DeepSpeed and megatron-core call (bloomtrain calls none of
  them): raised in those libraries' code, or by torch on their behalf (torch's deprecation of
  ``all_gather_into_tensor``, which DeepSpeed's ZeRO calls every step).

Three routes reach the terminal, and each is covered: Python warnings (``warnings.showwarning``),
DeepSpeed's own logger (it prints to stdout through a handler of its own, created when DeepSpeed is
imported; a filter set on the logger beforehand applies to it) and plain ``print`` calls inside a
library call (:func:`library_prints`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

LIBRARY_NOTICES = re.compile("|".join([
    r"Setting accelerator to CPU",
    r"Setting ds_accelerator to ",
    r"^DeepSpeed \S+ built successfully",
    r"Transformer Engine and Apex are not installed",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"Custom kwargs can be passed to `--metadata`",  # lm-eval, for every task with a dataset function
]))
"""Messages that go to the log whoever raises them."""

LIBRARY_PACKAGES = ("deepspeed", "megatron")
"""Deprecation warnings raised while these libraries' code runs go to the log too."""

library_log = logging.getLogger("bloomtrain.libraries")
library_log.propagate = False
library_log.addHandler(logging.NullHandler())

_routed = False


def route_library_notices(log_file: Path | None = None) -> None:
    """Send the library notices above to ``log_file`` (appended; None: drop them). Call once per process,
    before DeepSpeed or megatron-core is imported; calling again only changes the file."""
    global _routed
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        for old in [h for h in library_log.handlers if isinstance(h, logging.FileHandler)]:
            library_log.removeHandler(old)
            old.close()
        library_log.addHandler(handler)
    if _routed:
        return
    _routed = True
    show = warnings.showwarning

    def show_or_log(message, category, filename, lineno, file=None, line=None) -> None:
        if is_library_notice(str(message), category, filename):
            library_log.warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_or_log
    for name in ("DeepSpeed", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_keep_off_the_terminal)


def is_library_notice(message: str, category: type[Warning] = UserWarning, filename: str = "") -> bool:
    if LIBRARY_NOTICES.search(message):
        return True
    from_library = any(f"/{package}/" in filename for package in LIBRARY_PACKAGES)
    return from_library and issubclass(category, (DeprecationWarning, FutureWarning))


def _keep_off_the_terminal(record: logging.LogRecord) -> bool:
    if is_library_notice(record.getMessage()):
        library_log.info("%s: %s", record.name, record.getMessage())
        return False
    return True


class _LineRouter(io.TextIOBase):
    """A stdout for a library call: notices to the log, every other line to the real stdout."""

    def __init__(self, terminal) -> None:
        self.terminal = terminal
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if is_library_notice(line):
                library_log.info("%s", line)
            else:
                self.terminal.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.terminal.flush()


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Around a library call that ``print``s notices (DeepSpeed's op builds)."""
    router = _LineRouter(sys.stdout)
    with contextlib.redirect_stdout(router):
        yield
    router.flush()


class _ToLibraryLog(io.TextIOBase):
    def write(self, text: str) -> int:
        if text.strip():
            library_log.info("%s", text.strip("\r\n"))
        return len(text)


@contextlib.contextmanager
def task_scoring_quietly() -> Iterator[None]:
    """Around lm-eval's run inside a training run: its progress bars (one per task, with no switch to turn
    them off), its INFO/WARNING lines (the tasks it selected, "Overwriting default num_fewshot") and the
    complaint of the ``git describe`` it runs for its results outside a repository (written straight to
    file descriptor 2) go to the log; bloomtrain says on the terminal which scores it got. lm-eval's
    errors still reach the terminal."""
    files = [h.baseFilename for h in library_log.handlers if isinstance(h, logging.FileHandler)]
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    terminal = logging.StreamHandler(os.fdopen(os.dup(terminal_fd), "w", buffering=1))
    terminal.setLevel(logging.ERROR)
    lm_eval = logging.getLogger("lm_eval")
    saved = lm_eval.propagate, lm_eval.handlers[:], lm_eval.level
    lm_eval.handlers[:] = [terminal, *[h for h in library_log.handlers if isinstance(h, logging.FileHandler)]]
    lm_eval.propagate = False
    lm_eval.setLevel(logging.INFO)
    try:
        with open(files[0] if files else os.devnull, "a") as log:
            os.dup2(log.fileno(), 2)
        with contextlib.redirect_stderr(_ToLibraryLog()):
            yield
    finally:
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
        terminal.stream.close()
        lm_eval.propagate, lm_eval.handlers[:] = saved[0], saved[1]
        lm_eval.setLevel(saved[2])
