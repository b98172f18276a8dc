"""The error every config check raises, and the checks themselves."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A configuration value a user must change; the message names the key and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_finite_numbers(config: object, prefix: str) -> None:
    """``inf``/``nan`` pass every range check written as a comparison; refuse them once, everywhere."""
    for name, value in vars(config).items():
        if isinstance(value, float):
            require(math.isfinite(value), f"{prefix}{name}={value} must be a finite number")
        elif hasattr(value, "__dataclass_fields__"):
            require_finite_numbers(value, f"{prefix}{name}.")
