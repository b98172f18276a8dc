"""The data tools' user-facing failure: what a user fixes by changing a key or an input."""

from __future__ import annotations


class DataError(ValueError):
    """Its message is one line that names the key (or the input) to change and what to try; the
    pipeline prints it as it is, with the stage and task, and never a traceback."""
