"""Large actor results that stay on the worker until their caller asks for them.

An actor's method that returns a large value (:data:`HOLD_MIN` bytes or more pickled, the buffers
that travel out of band counted: a numpy array's, a tensor's storage) does not send it back when
the call ends. The session keeps the value (:class:`HeldResults`) and the call's outcome is a
small :class:`HeldResult` that names it: the record says the call is done, its value held. The
caller's :meth:`~rtq.executor.TaskFuture.result` then fetches it through the session's call
list (:func:`fetch_result`), once; a caller that only chains calls, or drops the future, never
moves the bytes. A value nobody asks for is freed when its future is garbage collected (the
next call to the actor says so), when the actor closes, or :data:`HOLD_S` seconds after the
call's deadline at the latest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import sources
from ..errors import ResultFreed

__all__ = ["HOLD_MIN", "HOLD_S", "HeldResult", "HeldResults", "is_large"]

HOLD_MIN = 1 << 20
"""Smallest pickled result (bytes) an actor holds instead of sending it back at once."""
HOLD_S = 600.0
"""Seconds past the later of the call's deadline and its end that an unasked-for value stays held."""


@dataclass(frozen=True)
class HeldResult:
    """What an actor call whose value stays on the worker returns in its place.

    Attributes:
        task_id: The call the value came from (what fetches it).
        type: The value's type name.
        nbytes: About how many bytes it holds.
    """

    task_id: str
    type: str
    nbytes: int

    def __repr__(self) -> str:
        return f"<rtq held result of call {self.task_id}: {self.type}, {self.nbytes} bytes, on its worker>"


class _Large(Exception):
    """Raised inside the measuring pickler once the value proved large (ends the pickling)."""


class _Counter:
    """A file that counts what is written to it and stops the pickler past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.grow(n)
        return n

    def buffer(self, buffer: Any) -> bool:
        """An out-of-band buffer counts whole (it would be sent as a frame of its own)."""
        self.grow(buffer.raw().nbytes)
        return False

    def grow(self, n: int) -> None:
        self.size += n
        if self.size >= self.limit:
            raise _Large


def is_large(value: Any, limit: int = HOLD_MIN) -> bool:
    """Whether ``value`` pickles to ``limit`` bytes or more, its out-of-band buffers counted.

    Pickles at most ``limit`` bytes of it (the pickling stops as soon as it knows; an array's
    buffer is counted, never copied), so a small value costs a small pickle. A value that
    cannot be pickled is not large: sending it back names the culprit, as for any result.
    """
    if value is None or isinstance(value, (bool, int, float, complex)):
        return False
    try:
        counter = _Counter(limit)
        sources.Pickler(counter, protocol=5, buffer_callback=counter.buffer).dump(value)
    except _Large:
        return True
    except Exception:  # unpicklable: the ordinary path reports it
        return False
    return False


class HeldResults:
    """The large results one session holds for their callers, until fetched, dropped or expired."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[Any, HeldResult, float]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def hold(self, task_id: str, value: Any, type_name: str, nbytes: int, deadline: float) -> HeldResult:
        """Keep ``value`` until ``deadline`` (Unix seconds, plus :data:`HOLD_S`); what stands in for it."""
        held = HeldResult(task_id, type_name, nbytes)
        with self._lock:
            self._values[task_id] = (value, held, max(deadline, time.time()) + HOLD_S)
        return held

    def take(self, task_id: str, label: str) -> Any:
        """The value held for call ``task_id``, no longer held.

        Raises:
            ResultFreed: It is not held (fetched already, dropped, or expired).
        """
        with self._lock:
            entry = self._values.pop(task_id, None)
        if entry is None:
            raise ResultFreed(
                f"the result of call {task_id} to {label!r} is no longer held on its worker: it was fetched "
                f"already, or nobody asked for it within {HOLD_S:g} s of the call's deadline"
            )
        return entry[0]

    def drop(self, task_ids: list[str] | tuple[str, ...]) -> None:
        """Free the values of calls whose futures are gone."""
        with self._lock:
            for task_id in task_ids:
                self._values.pop(task_id, None)

    def expire(self, now: float) -> bool:
        """Free the values held past their time; whether any was."""
        with self._lock:
            old = [k for k, (_, _, until) in self._values.items() if until <= now]
            for task_id in old:
                del self._values[task_id]
        return bool(old)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def listing(self) -> list[list[Any]]:
        """``[task_id, type, bytes]`` of each value held (for the session's record)."""
        with self._lock:
            return [[h.task_id, h.type, h.nbytes] for _, h, _ in self._values.values()]
