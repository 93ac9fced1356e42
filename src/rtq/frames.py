"""Where a task's exception was raised: recorded on the worker, shown by the notebook.

A pickled exception loses its traceback. So the worker records it first, as data that travels
with the exception (:func:`annotate`): the frames (file, line, function) of the task's own code —
from the user's function or cell on, not rtq's frames that called it — and a note naming the
worker's host and pid, shown under the message wherever the exception is printed.

The exception arrives as itself, carrying a :class:`RemoteFrames` as its ``_render_traceback_``:
IPython's hook for exceptions that bring their own traceback (as ipyparallel's remote errors
do). A notebook then shows the caller's own frames (the cell that called ``fut.result()``, not
``concurrent.futures``), then the task's frames as if they had run there — a notebook cell by its
number with its lines (the code kept its file name, see :mod:`rtq.sources`), a file by its path —
then the message and the worker line. Outside IPython nothing calls the hook: the worker's
traceback text comes as the exception's cause, as always.

This module imports no IPython (workers use it); rendering is :mod:`rtq.notebook.tracebacks`.
"""

from __future__ import annotations

import os
import socket
import traceback

__all__ = ["RemoteFrames", "annotate", "remote_frames"]

_PACKAGE_DIR = os.path.normcase(os.path.dirname(os.path.abspath(__file__))) + os.sep


class RemoteFrames:
    """The worker-side frames of a task's exception; IPython calls it to show the traceback.

    Attributes:
        exc: The exception it belongs to.
        frames: ``(filename, line, function)`` of each frame, outermost first.
        where: The note naming the worker, e.g. ``"(raised on worker gpu1, pid 4242)"``.
        caller_frames: Whether the caller's own frames are shown above the task's (no for a
            ``%%rtq`` cell, whose caller is the magic's machinery).
    """

    def __init__(self, exc: BaseException, frames: list[tuple[str, int, str]], where: str, caller_frames: bool) -> None:
        self.exc = exc
        self.frames = frames
        self.where = where
        self.caller_frames = caller_frames

    def __call__(self) -> list[str]:
        from .notebook.tracebacks import render_remote

        return render_remote(self.exc, self)

    def __repr__(self) -> str:
        return f"<rtq.RemoteFrames of {type(self.exc).__name__}, {len(self.frames)} frame(s) {self.where}>"


def annotate(exc: BaseException, what: str = "", *, caller_frames: bool = True) -> None:
    """Record where ``exc`` was raised, in attributes that travel with it when it is pickled.

    Call it where rtq's code that ran the task's code catches the exception: the frames of
    rtq's own modules at the top of the traceback are left out. An exception recorded already
    (by a ``%%rtq`` cell, which runs inside a shipped call) keeps that record.

    Args:
        exc: The exception the task's code raised.
        what: What ran, for the note (``"the %%rtq cell"``); empty: a task.
        caller_frames: Whether the caller shows its own frames above the task's.
    """
    if remote_frames(exc) is not None:
        return
    frames = traceback.extract_tb(exc.__traceback__)
    while frames and os.path.normcase(os.path.abspath(frames[0].filename)).startswith(_PACKAGE_DIR):
        frames.pop(0)
    where = f"(raised {f'in {what} ' if what else ''}on worker {socket.gethostname()}, pid {os.getpid()})"
    remote = RemoteFrames(exc, [(f.filename, f.lineno or 0, f.name) for f in frames], where, caller_frames)
    try:
        exc._render_traceback_ = remote  # type: ignore[attr-defined]
        if hasattr(exc, "add_note") and where not in getattr(exc, "__notes__", ()):
            exc.add_note(where)
    except (AttributeError, TypeError):  # an exception type without a __dict__: it travels bare
        pass


def remote_frames(exc: BaseException) -> RemoteFrames | None:
    """The worker-side frames ``exc`` carries, or None when it was not raised by a task's code."""
    remote = getattr(exc, "_render_traceback_", None)
    return remote if isinstance(remote, RemoteFrames) else None
