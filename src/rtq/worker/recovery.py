"""Giving back the tasks of workers that died, and the dead-letter list.

A worker's lease is its heartbeat key, which expires on the Redis server's clock; the ``workers``
sorted set only says *when to look* (its score is when the lease should end, on the worker's
clock). Any live worker — and any caller waiting on a task — can reap a lapsed worker: each of
its claimed tasks goes back to the front of its queue, or fails with ``WorkerLost`` once it has
used up its ``max_attempts`` (the limit it was submitted under, stored with it, whoever reaps) —
except a call to a session, whose state died with the worker: it fails with ``SessionLost`` at
once and never runs again (at most once).
An id the worker had moved but not yet claimed (left in one of its landing lists) joins its
in-progress list first and goes back to its queue with the rest, having used no attempt.
Each step is one Lua call that first removes the id from the dead worker's list, so two reapers
never requeue the same task twice. A worker that died while sending a result leaves none of it:
a result with extra frames is one transaction with ``finish.lua`` (see :mod:`rtq.worker.outcome`).
"""

from __future__ import annotations

import json
import logging
import time

from ..backend.sessions import SessionRecords, died_reason
from ..backend.store import TaskStore
from ..backend.workers import WorkerRegistry
from ..errors import SessionLost, WorkerLost
from ..task import TaskState

logger = logging.getLogger("rtq.worker")


class Reaper:
    """Recovers the tasks of lapsed workers of one queue namespace.

    Args:
        store: The namespace's task records.
        max_attempts: The limit applied to records that carry none of their own (an older rtq).
    """

    def __init__(self, store: TaskStore, max_attempts: int) -> None:
        self.registry = WorkerRegistry(store)
        self.sessions = SessionRecords(store)
        self.max_attempts = max_attempts

    def lapsed(self, exclude: str | None = None) -> list[str]:
        """Ids of workers whose lease ended (checked against the server-side key, not clocks)."""
        return self.registry.lapsed(exclude)

    def reap(self, exclude: str | None = None) -> int:
        """Give back the tasks of every lapsed worker; returns how many tasks moved."""
        moved = 0
        for worker in self.lapsed(exclude):
            moved += self.give_back(worker)
        return moved

    def owner_lapsed(self, task_id: str) -> bool:
        """Whether ``task_id`` is claimed by a worker whose lease ended."""
        state, owner = self.registry.owner(task_id)
        if state != TaskState.RUNNING or not owner:
            return False
        return not self.registry.is_alive(owner)

    def give_back(self, worker: str, *, refund: bool = False, only: list[str] | None = None) -> int:
        """Requeue (or fail) each task ``worker`` claimed; ``refund`` keeps its attempt count.

        ``only`` limits it to those ids (a live worker giving back ids it does not hold).
        Returns how many tasks were requeued or failed.
        """
        moved = 0
        if only is None:
            self.registry.land(worker)  # ids moved but never claimed: given back with the rest
        for task_id in self.registry.claimed(worker) if only is None else only:
            name, notify, attempt, limit, session = self.registry.lost_task(task_id)
            error: BaseException
            if session:  # it ran against state that lived in that worker alone: never run it again
                error = self._session_lost(session, task_id, worker, refund)
            else:
                error = WorkerLost(
                    f"task {task_id} in {name} was lost with its worker {worker} "
                    f"after {attempt or '?'} attempt(s) (max_attempts={_limit(limit, self.max_attempts)})"
                )
            outcome = self.registry.give_back(
                task_id,
                worker,
                name=name,
                notify=notify,
                max_attempts=self.max_attempts,
                error=error,
                entry=self._entry(task_id, name, error, worker),
                refund=refund,
                never_requeue=bool(session),
            )
            if outcome != "skipped":
                moved += 1
                logger.warning("task %s of worker %s: %s", task_id, worker, outcome)
        if not refund and only is None:
            self.registry.forget(worker)
        return moved

    def _session_lost(self, session_id: str, task_id: str, worker: str, stopped: bool) -> SessionLost:
        """The error of a call to a session whose worker died (or stopped before it ended)."""
        label, host = self.sessions.label(session_id)
        if stopped:
            reason = f"worker stopped: its worker {worker} on {host or '?'} shut down before the call ended"
        else:
            reason = died_reason(worker, host)
            self.sessions.close(session_id, reason, only_if_open=True)
        return SessionLost(
            f"session {label or session_id!r} is lost: {reason}; call {task_id} did not complete and is never run again"
        )

    def dead_letter(self, task_id: str, name: str, error: BaseException, worker: str = "") -> None:
        """Keep a failed task's id and error in the dead-letter list for inspection."""
        self.registry.dead_letter(self._entry(task_id, name, error, worker))

    @staticmethod
    def _entry(task_id: str, name: str, error: BaseException, worker: str) -> str:
        return dead_letter_entry(task_id, name, error, worker)

    def dead_letters(self, count: int = 100) -> list[dict[str, object]]:
        """The newest ``count`` dead-letter entries, newest first."""
        return self.registry.dead_letters(count)


def dead_letter_entry(task_id: str, name: str, error: BaseException, worker: str = "") -> str:
    """The dead-letter list's JSON entry for task ``task_id`` of queue ``name``, failed with ``error``."""
    return json.dumps(
        {
            "id": task_id,
            "queue": name,
            "error": f"{type(error).__name__}: {error}",
            "worker": worker,
            "time": time.time(),
        }
    )


def _limit(stored: str, own: int) -> int:
    """A record's attempt limit as recover.lua reads it: its own field, else the reaper's."""
    try:
        return int(stored)
    except ValueError:  # absent (an older rtq wrote the record) or garbage, as tonumber() sees it
        return own
