"""How a task's exception is kept in its record besides its envelope: the ``error_text`` JSON.

``error_text`` holds the exception's type name, message and worker-side traceback as plain text.
It lets a caller that cannot rebuild the exception (its class is missing here) still say what
failed, ``rtq status`` and dead letters show the error line, and the traceback ride along as the
``__cause__`` of the re-raised exception. It is unsigned: under a secret it only ever stands in
for an envelope that verified (see :meth:`TaskStore.error_of`).
"""

from __future__ import annotations

import json
import traceback
from typing import Any

__all__ = ["RemoteTraceback", "describe_error", "error_info"]


def describe_error(exc: BaseException) -> dict[str, str]:
    """``{type, message, traceback}`` of ``exc``, each clipped small enough to travel."""
    tb = _clip("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return {"type": _qualname(type(exc)), "message": _clip(_safe_str(exc)), "traceback": tb}


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a hostile or broken __str__ must not stop the outcome from being stored
        return f"<{type(exc).__name__}: str() failed>"


def _clip(value: str, limit: int = 100_000) -> str:
    """Keep error text small enough to travel whatever the payload limit."""
    return value if len(value) <= limit else value[: limit // 2] + "\n[... clipped ...]\n" + value[-limit // 2 :]


def error_info(value: Any) -> dict[str, str]:
    """The ``error_text`` JSON as ``{type, message, traceback}``, or {} when absent or malformed."""
    try:
        info = json.loads(value) if value else {}  # str or bytes, as the client returns it
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    return {
        "type": str(info.get("type", "Exception")),
        "message": str(info.get("message", "")),
        "traceback": str(info.get("traceback", "")),
    }


def _qualname(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class RemoteTraceback(Exception):
    """Carries the worker-side traceback as the ``__cause__`` of a re-raised task exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.tb.rstrip()
