"""What a worker's threads share: its identity and settings, and the tasks it holds, under one lock.

The listener's claiming and task threads write it; the watchdog (:mod:`rtq.worker.watchdog`)
reads it to beat, to stop unwanted tasks and to audit the worker's in-progress list. It is the
only thing they share besides the backend.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .run import Run

__all__ = ["WorkerState"]


@dataclass(eq=False)
class WorkerState:
    """One worker's shared state.

    Attributes:
        id: The worker's id (``host:pid:random``).
        names: The queues it serves.
        lease: Seconds its heartbeat stays valid.
        period: Seconds between its heartbeats.
        marker_ttl: Seconds a queue's listener marker lives.
        info: Its announced record (host, pid, queues, slots, versions, GPUs…).
        stopping: Set when it stops claiming.
        lock: Guards ``active``, ``claiming`` and ``tasks_done``.
        active: The attempts it runs, by task id.
        claiming: Ids moved into its in-progress list and not yet in ``active``.
        tasks_done: How many tasks it finished.
    """

    id: str
    names: list[str]
    lease: float
    period: float
    marker_ttl: float
    info: dict[str, Any]
    stopping: threading.Event
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict[str, Run] = field(default_factory=dict)
    claiming: set[str] = field(default_factory=set)
    tasks_done: int = 0

    def held(self) -> set[str]:
        """The ids it holds now (running or being claimed)."""
        with self.lock:
            return set(self.active) | self.claiming

    def running(self) -> list[Run]:
        """The attempts it runs now."""
        with self.lock:
            return list(self.active.values())
