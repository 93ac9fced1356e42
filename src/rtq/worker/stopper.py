"""Stopping a running task from outside its thread: the way to end a task that never calls update().

A cancelled task normally learns it at its next ``update()``, which raises ``TaskCancelled``. A
task that never reports progress would run on until it ends, holding a slot (and perhaps a GPU)
for a result nobody will read. So the worker checks the state of its running tasks on every
heartbeat, and when one was cancelled, taken over by another worker, lost with its data, or ran
past its deadline, it raises the exception *asynchronously* in the task's thread
(``PyThreadState_SetAsyncExc``), again on every beat until the task ends.

Limits — this is a last resort, not a kill:

* The exception is raised only when the thread next runs Python bytecode. A task inside one long
  C call (``time.sleep``, a numpy or CUDA kernel, blocking I/O) stops when that call returns.
* Task code can catch it (``except Exception``); it is then raised again at the next beat.
* It can land anywhere in the task's Python code, including a ``finally`` block or a library in
  the middle of an update; the task's own state may be left inconsistent. The worker's shared
  Redis connections are safe: progress reports run shielded, and the task's outcome is fenced
  (discarded) anyway.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopper"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


def _raise_in(ident: int, exc_type: type[BaseException] | None) -> int:
    """Schedule ``exc_type`` in thread ``ident`` (None clears a pending one); returns threads hit."""
    # Without argtypes, ctypes passes None as NULL, which is how a pending exception is cleared.
    arg = ctypes.py_object(exc_type) if exc_type is not None else None
    return int(_set_async_exc(ctypes.c_ulong(ident), arg))


class Stopper:
    """Delivers an exception into one task's thread, but only while the task's own code runs.

    The worker arms it around the task function; outside that window (storing the outcome,
    returning the thread to the pool) nothing is ever raised, and a pending exception is cleared
    when the task function returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._shielded = 0
        self.reason: str | None = None
        self.exc_type: type[BaseException] | None = None
        self.noticed: float | None = None  # when the worker first saw the task must stop
        self.finished = False  # the task function returned: its outcome is being stored

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Let :meth:`stop` reach the current thread while the block runs."""
        with self._lock:
            self._ident = threading.get_ident()
            pending = self.exc_type
        try:
            if pending is not None:  # stopped before it even started
                raise pending(self.reason or "")
            yield
        finally:
            self._disarm()

    def _disarm(self) -> None:
        # A stop scheduled just before the task function returned may fire right here; it was
        # meant for the task, which has ended, so it is dropped and the disarming retried.
        while True:
            try:
                with self._lock:
                    self._ident = None
                    self.finished = True
                    if self.exc_type is not None:
                        _raise_in(threading.get_ident(), None)
                return
            except BaseException as exc:
                if self.exc_type is None or not isinstance(exc, self.exc_type):
                    raise

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Hold off stops while the block runs (a Redis round trip on a shared connection)."""
        with self._lock:
            if self._ident is not None and self.exc_type is not None:
                _raise_in(threading.get_ident(), None)  # one scheduled just before we got here
            self._shielded += 1
        try:
            yield
        finally:
            with self._lock:
                self._shielded -= 1

    def stop(self, exc_type: type[BaseException], reason: str) -> bool:
        """Raise ``exc_type`` in the task's thread soon; returns False when not possible now."""
        with self._lock:
            self.reason, self.exc_type = reason, exc_type
            if self._ident is None or self._shielded:
                return False
            return _raise_in(self._ident, exc_type) == 1

    @property
    def requested(self) -> bool:
        return self.exc_type is not None
