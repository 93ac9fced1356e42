"""Checks of the arguments users hand to rtq, with errors that name the argument and what is allowed.

Each check returns the value it accepted (normalised where that helps: an int timeout stays as
given) and raises ``TypeError`` for a value of the wrong kind, ``ValueError`` (a
:class:`~rtq.errors.ConfigurationError`, which is both) for one out of range. They are cheap
enough for the hot paths (``query()`` checks its ``timeout`` on every call) and depend on
nothing but :mod:`rtq.errors`, so every layer may use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "GLOB_CHARS",
    "check_callable",
    "check_count",
    "check_no_glob",
    "check_seconds",
    "check_wait",
    "describe",
]

GLOB_CHARS = "*?[]\\"
"""Characters Redis reads as a pattern in ``SCAN MATCH``: a prefix holding one would match others'."""


def describe(value: Any, limit: int = 60) -> str:
    """``value`` as an error message shows it: its type and a short repr."""
    try:
        shown = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        shown = "<unrepresentable>"
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return f"{type(value).__name__} {shown}"


def _is_number(value: Any) -> bool:
    # bool is an int, but True as a number of seconds or workers is always a slip
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number of seconds, above zero (or at least zero with ``allow_zero``).

    Raises:
        TypeError: ``value`` is not a number.
        ConfigurationError: it is NaN, infinite, or too small.
    """
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, not {describe(value)}")
    if math.isfinite(value) and (value > 0 or (allow_zero and value == 0)):
        return value  # type: ignore[no-any-return]
    least = "zero or more" if allow_zero else "above zero"
    raise ConfigurationError(f"{name} must be a finite number of seconds {least}, not {value!r}")


def check_wait(name: str, value: Any) -> float | None:
    """A wait in ``concurrent.futures`` style: None (no limit) or a finite number of seconds.

    Zero or less means "do not wait", as in the standard library.

    Raises:
        TypeError: ``value`` is neither None nor a number.
        ConfigurationError: it is NaN or infinite (None is how to wait without a limit).
    """
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{name} must be None (no limit) or a number of seconds, not {describe(value)}")
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be None (no limit) or a finite number of seconds, not {value!r}")
    return value  # type: ignore[no-any-return]


def check_count(name: str, value: Any, *, least: int = 1) -> int:
    """A whole number of at least ``least``.

    Raises:
        TypeError: ``value`` is not an int.
        ConfigurationError: it is smaller than ``least``.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, not {describe(value)}")
    if value < least:
        raise ConfigurationError(f"{name} must be at least {least}, not {value!r}")
    return value


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """``value`` if it can be called.

    Raises:
        TypeError: it cannot.
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable (a function, lambda or class), not {describe(value)}")
    return value  # type: ignore[no-any-return]


def check_no_glob(kind: str, value: str) -> str:
    """``value`` if it holds none of :data:`GLOB_CHARS`.

    Raises:
        ConfigurationError: it holds one.
    """
    found = sorted({c for c in value if c in GLOB_CHARS})
    if found:
        raise ConfigurationError(
            f"{kind} {value!r} must not contain {' or '.join(map(repr, found))}: Redis reads "
            f"{', '.join(map(repr, GLOB_CHARS))} as a key pattern, so it would match other namespaces' keys"
        )
    return value
