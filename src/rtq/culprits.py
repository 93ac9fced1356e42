"""Naming the part of a value that cannot be pickled: ``cannot ship args[0]: _thread.lock``.

When pickling a payload fails, :func:`describe_unpicklable` walks down the parts pickling
descends into (a call's function and arguments, containers, a function's captured cells and
globals, an object's attributes) to the innermost one that fails alone, so the error names it
and where it sits.
"""

from __future__ import annotations

import io
import types
from typing import Any

import cloudpickle

__all__ = ["describe_unpicklable"]


def describe_unpicklable(obj: Any, what: str, exc: BaseException) -> str:
    """Say which part of ``obj`` could not be pickled, e.g. ``args[0]: _thread.lock``."""
    path, culprit = _find_culprit(obj, what, depth=0)
    path = path or what
    kind = f"{type(culprit).__module__}.{type(culprit).__qualname__}"
    if kind.startswith("builtins."):
        kind = kind[len("builtins.") :]
    return f"cannot ship {path}: {kind} cannot be pickled ({type(exc).__name__}: {exc})"


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dump(obj, _NullWriter(), protocol=5, buffer_callback=lambda b: None)
    except Exception:
        return False
    return True


def _find_culprit(obj: Any, path: str, depth: int) -> tuple[str, Any]:
    if depth > 8:
        return path, obj
    for child_path, child in _parts(obj, path):
        if not _picklable(child):
            return _find_culprit(child, child_path, depth + 1)
    return path, obj


def _parts(obj: Any, path: str) -> list[tuple[str, Any]]:
    """The parts of ``obj`` pickling descends into, each with the path that names it."""
    from .calls import Call

    if isinstance(obj, Call):  # a shipped call reads best as the call the user wrote
        name = getattr(obj.fn, "__qualname__", None) or type(obj.fn).__qualname__
        return [
            (f"function {name}", obj.fn),
            *((f"args[{i}]", v) for i, v in enumerate(obj.args)),
            *((f"kwargs[{k!r}]", v) for k, v in obj.kwargs.items()),
        ]
    if isinstance(obj, (list, tuple)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, types.MethodType):
        return [(f"{path}.__self__", obj.__self__)]
    if isinstance(obj, types.FunctionType):
        # A function shipped by value carries its captured cells and the globals it names.
        names = obj.__code__.co_freevars
        cells = zip(names, obj.__closure__ or (), strict=True)
        parts = [(f"{path} (captured {n!r})", c.cell_contents) for n, c in cells if _cell_filled(c)]
        parts += [(f"{path} (global {n!r})", obj.__globals__[n]) for n in obj.__code__.co_names if n in obj.__globals__]
        return parts
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    return []


def _cell_filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents  # an empty cell (a name not yet bound) raises
    except ValueError:
        return False
    return True


class _NullWriter(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)
