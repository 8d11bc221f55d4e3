"""One error type for bad input, raised before any work starts and printed without a traceback."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class ConfigError(ValueError):
    """A bad option: the message names the option and, where it applies, the allowed values."""


def config_error(error: BaseException) -> ConfigError | None:
    """The `ConfigError` that caused `error`, if one did: jsonargparse wraps the errors of the classes it builds."""
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__ or error.__context__
    return error


def check_choice(option: str, value: object, allowed: Iterable[object]) -> None:
    """Raise `ConfigError` unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{option}: unknown value {value!r}; allowed: {names}")


def check_range(option: str, value: float | int | None, low: float | None = None, high: float | None = None, *, open_low: bool = False) -> None:
    """Raise `ConfigError` unless low ≤ value ≤ high (low < value with `open_low`); None passes (unset)."""
    if value is None:
        return
    below = low is not None and (value <= low if open_low else value < low)
    if below or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if open_low else '≥'} {low}"
        hi = "" if high is None else f"≤ {high}"
        raise ConfigError(f"{option}: {value} is out of range; allowed: {' and '.join(x for x in (lo, hi) if x)}")


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Raise `ConfigError` unless `folder` exists as a writable folder or can be created: proven by creating
    (and removing) a nameless file in its deepest existing folder, since `os.access` says yes to root for
    everything, /proc and /sys included."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option}: cannot write to {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{option}: cannot write to {folder}: {existing} is not writable ({e.strerror})") from None


def check_output_file(path: str | os.PathLike, option: str, suffixes: Iterable[str] | None = None) -> None:
    """Raise `ConfigError` unless a file can be written at `path` (with one of `suffixes`, when given)."""
    path = Path(path)
    allowed = list(suffixes or ())
    if allowed and path.suffix.lower() not in allowed:
        raise ConfigError(f"{option}: {path} has suffix {path.suffix or '(none)'!r}; allowed: {', '.join(allowed)}")
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give a file name")
    check_writable(path.parent, option)
