"""A worker's task slots: a counting semaphore that hands a freed slot to the longest waiter.

``threading.Semaphore`` lets the thread that releases a slot take it straight back before a
thread it woke can run (the woken one needs the GIL, which the releaser still holds). A worker
with fewer slots than queues has claiming threads of every queue waiting for a slot, and the one
that holds it finds its queue empty every ``wait_cap`` (0.1 s), releases it, and takes it back:
the other queues' tasks waited for minutes, or until their deadline. :class:`Slots` hands a
released slot to the thread that has waited longest, so the queues take turns.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["Slots"]


class Slots:
    """``count`` slots, taken and given back as a ``threading.Semaphore``'s, but first come, first served.

    A free slot exists only while nobody waits: :meth:`release` hands it to the oldest waiter.
    """

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._free = count
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a slot; wait up to ``timeout`` seconds (None: until one is free) unless not ``blocking``."""
        with self._lock:
            if self._free:
                self._free -= 1
                return True
            if not blocking:
                return False
            gate = threading.Lock()
            gate.acquire()
            self._waiters.append(gate)
        if gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return True  # a releaser handed its slot over
        with self._lock:
            try:
                self._waiters.remove(gate)
            except ValueError:  # handed over just as the wait ended: the slot is ours
                return True
        return False

    def release(self) -> None:
        """Give a slot back: to the thread that has waited longest, else to the free ones."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1
