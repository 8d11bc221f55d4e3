"""One error type for bad input, raised before any work starts and printed without a traceback."""
from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad option: the message names the option and, where it applies, the allowed values."""


def check_choice(option: str, value: object, allowed: Iterable[object]) -> None:
    """Raise `ConfigError` unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{option}: unknown value {value!r}; allowed: {names}")
