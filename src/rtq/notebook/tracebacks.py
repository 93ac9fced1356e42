"""Showing a remote cell's exception as if the cell had failed here.

A pickled exception loses its traceback. The worker records the frames (file, line, function)
from the cell on (see :func:`rtq.notebook.cells.run_cell`); here they are turned back into a real
traceback object — each frame made by running a one-line ``raise`` compiled under the original
file name at the original line, the technique template engines use to point tracebacks at
template lines. The cell's source sits in ``linecache`` under the same file name, so IPython's
traceback printer shows the cell's own lines, with "Cell In[n]" as for any cell.

The exception gets a ``_render_traceback_`` method (IPython's hook for exceptions that bring
their own traceback, as ipyparallel's remote errors do), so the notebook shows those frames and
not the magic's internals, while the exception keeps its own type.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..errors import RemoteTaskError

__all__ = ["prepare", "remote_traceback"]


class _Marker(Exception):
    pass


def _frame(filename: str, lineno: int, name: str, tb_next: types.TracebackType | None) -> types.TracebackType | None:
    if name.startswith("<"):
        # A comprehension, generator expression or lambda: IPython's printer cannot place such
        # a scope in a cell (whose ``%%rtq`` line is not Python) and would show the cell's first
        # line; as a module-level frame it shows the failing line.
        name = "<module>"
    try:
        code = compile("\n" * max(lineno - 1, 0) + "raise __rtq_marker__", filename, "exec", dont_inherit=True)
        code = code.replace(co_name=name)
    except (SyntaxError, ValueError):
        return tb_next
    try:
        exec(code, {"__rtq_marker__": _Marker, "__name__": "__rtq_remote__"})
    except _Marker:
        tb = sys.exc_info()[2]
    else:  # pragma: no cover - the code always raises
        return tb_next
    made = tb.tb_next if tb is not None else None  # skip this function's own frame
    if made is None:  # pragma: no cover
        return tb_next
    return types.TracebackType(tb_next, made.tb_frame, made.tb_lasti, made.tb_lineno)


def remote_traceback(frames: list[tuple[str, int, str]]) -> types.TracebackType | None:
    """A traceback whose frames sit at ``frames`` ((filename, line, function), outermost first)."""
    tb = None
    for filename, lineno, name in reversed(frames):
        tb = _frame(filename, lineno, name, tb)
    return tb


def prepare(exc: BaseException, shell: Any) -> BaseException:
    """Make ``exc`` (from a remote cell) render against the cell's lines in ``shell``; returns it."""
    frames = getattr(exc, "_rtq_cell_frames", None)
    if isinstance(exc, RemoteTaskError):
        # The exception could not travel as itself; its traceback text was made on the worker,
        # where the cell's source was in linecache too.
        text = exc.remote_traceback.rstrip() or f"{exc.type_name}: {exc.message}"
        _set_renderer(exc, lambda: [*text.splitlines(), "", f"(arrived as {type(exc).__module__}.RemoteTaskError)"])
        return exc
    if frames is None:
        return exc
    if type(exc.__cause__).__name__ == "_RemoteTraceback":
        exc.__cause__ = None  # its text repeats the frames shown below
        exc.__suppress_context__ = True
    tb = remote_traceback(list(frames))
    exc.__traceback__ = tb

    host = getattr(exc, "_rtq_host", "")

    def render() -> list[str]:
        lines = list(shell.InteractiveTB.structured_traceback(type(exc), exc, tb, tb_offset=0))
        if host and not hasattr(exc, "add_note"):  # Python 3.10: no notes; say where it ran here
            lines.append(f"(raised in the %%rtq cell on worker {host})")
        return lines

    _set_renderer(exc, render)
    return exc


def _set_renderer(exc: BaseException, render: Any) -> None:
    try:
        exc._render_traceback_ = render  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # no __dict__: IPython shows the ordinary traceback
        pass


def short_error(exc: BaseException, message: str) -> BaseException:
    """Make ``exc`` render as one line of text (an interrupt, a usage-like failure)."""
    _set_renderer(exc, lambda: [f"{type(exc).__name__}: {message}"])
    return exc
