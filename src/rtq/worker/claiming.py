"""The claiming of one queue: which threads wait on it, each on a connection of its own.

A thread that claims a task runs it itself (no hand-over between threads on a task's path),
so someone else must go on waiting on the queue meanwhile. Handing that on to a pool thread
the moment a task is claimed wakes that thread while the task runs: on a busy machine it takes
the GIL at the task's first pause (the check of a connection before the outcome is sent) and
holds it while it gets to its blocking move, and the outcome, and so the caller, wait for it.

So up to :data:`WAITING` threads wait on a queue at once. The one Redis hands a task to leaves
the other waiting, and nobody has to be woken; only a thread that takes a task while no other
waits hands the waiting on. Once its task has ended, a thread goes back to waiting if fewer
than :data:`WAITING` do, else it returns to the pool.

Each thread claims through a :class:`Lane`: its connection, and the landing list its blocking
move puts an id in for the claim sent in the same write (:meth:`Claims.take
<rtq.backend.claims.Claims.take>`). A lane is one thread's at a time, so the claim always finds
the id its own move landed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..backend.wire import Channel
from ..backoff import Backoff

__all__ = ["WAITING", "Claiming", "Lane"]

WAITING = 2
"""Most threads waiting on one queue at once (each holding a free slot and a connection)."""


@dataclass
class Lane:
    """What one claiming thread waits with: its connection and its landing list.

    ``registered``: the landing list is in the worker's set of them (recovery's to empty).
    """

    channel: Channel
    landing: str
    registered: bool = False


class Claiming:
    """The threads claiming from one queue, and their connections.

    ``waiting`` counts the threads in the claim loop, and the one a hand-on is starting (see
    :meth:`taken`); the claiming has ended once the worker stops and none is left (``ended``).

    Args:
        name: The queue.
        key: Its list.
        wait_cap: Longest BLMOVE, in seconds.
        connect: Makes a lane (a :class:`Channel` of the worker's client, a landing list of its own).
    """

    def __init__(self, name: str, key: str, wait_cap: float, connect: Callable[[], Lane]) -> None:
        self.name = name
        self.key = key
        self.wait_cap = wait_cap
        self.connect = connect
        self.backoff = Backoff(0.01, 5.0)  # after a failure, how long to wait before the next BLMOVE
        self.ended = threading.Event()  # set when it stopped (the worker shuts down)
        self.waiting = 1  # the first thread, started with the worker
        self._lock = threading.Lock()
        self._lanes: list[Lane] = []  # the idle ones

    def lane(self) -> Lane:
        """A lane for one claiming thread (BLMOVE and the claims); give it back with :meth:`leave`."""
        with self._lock:
            return self._lanes.pop() if self._lanes else self.connect()

    def taken(self) -> bool:
        """A waiting thread took a task: True when none waits now, and it must start one.

        The thread it starts is counted already (from here on, as this one was).
        """
        with self._lock:
            if self.waiting == 1:
                return True
            self.waiting -= 1
            return False

    def not_started(self) -> None:
        """The thread :meth:`taken` asked for could not be started (the pool shut down)."""
        with self._lock:
            self.waiting -= 1
            self._end_if_done()

    def rejoin(self, stopping: bool) -> bool:
        """A thread's task ended: True when it should go back to waiting (fewer than :data:`WAITING` do)."""
        with self._lock:
            if stopping or self.waiting >= WAITING:
                return False
            self.waiting += 1
            return True

    def leave(self, lane: Lane) -> None:
        """A waiting thread stops claiming (the worker stops); the last one ends the claiming."""
        with self._lock:
            self._lanes.append(lane)
            self.waiting -= 1
            self._end_if_done()

    def idle(self, lane: Lane) -> None:
        """A thread that ran a task returns to the pool: its lane waits for the next one."""
        with self._lock:
            self._lanes.append(lane)

    def _end_if_done(self) -> None:
        if self.waiting <= 0:
            for lane in self._lanes:
                lane.channel.close()
            self._lanes.clear()
            self.ended.set()
