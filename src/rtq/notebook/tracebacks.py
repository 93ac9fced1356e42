"""Showing a task's exception in IPython as if its code had failed here.

A task's exception arrives with its worker-side frames (:mod:`rtq.frames`, which IPython calls
through the exception's ``_render_traceback_``). Here they are turned back into a real traceback
object — each frame made by running a one-line ``raise`` compiled under the original file name
at the original line, the technique template engines use to point tracebacks at template lines —
and IPython's own printer formats it. A frame of a notebook cell (a ``%%rtq`` cell, or a helper
defined in an earlier cell: shipped code keeps its file name, see :mod:`rtq.sources`) then reads
``Cell In[n], line k`` with the cell's lines, exactly as a local error would; a file reads as
its path.

Above the task's frames come the caller's own (the cell that called ``fut.result()``), without
the machinery in between (``concurrent.futures``, asyncio, rtq); a ``%%rtq`` cell shows none,
its caller being the magic. The worker's traceback text, which the exception also carries as
its cause, is left out: it repeats the frames shown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import traceback
import types
from typing import TYPE_CHECKING, Any

from ..errors import RemoteTaskError

if TYPE_CHECKING:
    from ..frames import RemoteFrames

__all__ = ["prepare", "remote_traceback", "render_remote", "short_error"]

COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


def _machinery() -> tuple[str, ...]:
    """Where the frames between a cell and a task's exception live: IPython's, futures', rtq's."""
    packages = [concurrent.futures, asyncio, sys.modules["rtq"], sys.modules.get("IPython")]
    dirs = tuple(
        os.path.normcase(os.path.dirname(os.path.abspath(m.__file__))) + os.sep
        for m in packages
        if m is not None and m.__file__
    )
    return (*dirs, os.path.normcase(os.path.abspath(threading.__file__)))


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
        if hasattr(code, "co_qualname"):  # Python 3.11+: what IPython prints as "in NAME"
            code = code.replace(co_qualname=name)  # type: ignore[call-arg]  # mypy targets 3.10
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
    """A traceback whose frames sit at ``frames`` ((filename, line, function), outermost first).

    A comprehension's own frame (Python < 3.12 gives it one) on the very line of the frame that
    ran it is left out: it would print that frame a second time.
    """
    kept: list[tuple[str, int, str]] = []
    for filename, lineno, name in frames:
        if name in COMPREHENSIONS and kept and kept[-1][:2] == (filename, lineno):
            continue
        kept.append((filename, lineno, name))
    tb = None
    for filename, lineno, name in reversed(kept):
        tb = _frame(filename, lineno, name, tb)
    return tb


def _callers(tb: types.TracebackType | None, tail: types.TracebackType | None) -> types.TracebackType | None:
    """The frames of ``tb`` the user wrote (not rtq's, not concurrent.futures'), then ``tail``."""
    hidden = _machinery()
    mine = []
    while tb is not None:
        filename = os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename))
        if not filename.startswith(hidden):
            mine.append(tb)
        tb = tb.tb_next
    for entry in reversed(mine):
        tail = types.TracebackType(tail, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tail


def render_remote(exc: BaseException, remote: RemoteFrames) -> list[str]:
    """The lines IPython shows for ``exc``, a task's exception carrying its worker-side frames."""
    from ..backend.failures import RemoteTraceback

    if isinstance(exc.__cause__, RemoteTraceback):
        exc.__cause__ = None  # the worker's traceback text: it repeats the frames shown
        exc.__suppress_context__ = True
    tb = remote_traceback(remote.frames)
    if remote.caller_frames:
        tb = _callers(exc.__traceback__, tb)
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:  # called outside IPython: plain Python's format of the same frames
        lines = traceback.format_exception(type(exc), exc, tb)
    else:
        lines = list(shell.InteractiveTB.structured_traceback(type(exc), exc, tb, tb_offset=0))
    if not hasattr(exc, "add_note"):  # Python 3.10: no notes; say where it ran here
        lines.append(remote.where)
    return lines


def prepare(exc: BaseException, shell: Any) -> BaseException:
    """Make a ``%%rtq`` cell's ``exc`` that could not travel as itself show the worker's traceback."""
    if isinstance(exc, RemoteTaskError):
        # The exception could not travel as itself; its traceback text was made on the worker,
        # where the cell's source was in linecache too.
        text = exc.remote_traceback.rstrip() or f"{exc.type_name}: {exc.message}"
        _set_renderer(exc, lambda: [*text.splitlines(), "", f"(arrived as {type(exc).__module__}.RemoteTaskError)"])
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
