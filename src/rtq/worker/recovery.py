"""Giving back the tasks of workers that died, and the dead-letter list.

A worker's lease is its heartbeat key, which expires on the Redis server's clock; the ``workers``
sorted set only says *when to look* (its score is when the lease should end, on the worker's
clock). Any live worker — and any caller waiting on a task — can reap a lapsed worker: each of
its claimed tasks goes back to the front of its queue, or fails with ``WorkerLost`` once it has
used up its ``max_attempts`` (the limit it was submitted under, stored with it, whoever reaps).
Each step is one Lua call that first removes the id from the dead worker's list, so two reapers
never requeue the same task twice. A worker that died while sending a result leaves none of it:
a result with extra frames is one transaction with ``finish.lua`` (see :mod:`rtq.worker.outcome`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from ..backend.store import KEEP_S, text
from ..errors import WorkerLost
from ..task import TaskState

if TYPE_CHECKING:
    from ..task_queue import RedisTaskQueue

logger = logging.getLogger("rtq.worker")


class Reaper:
    """Recovers the tasks of lapsed workers of one queue namespace."""

    def __init__(self, queue: RedisTaskQueue) -> None:
        self.queue = queue
        self.keys = queue.keys
        self.store = queue.store
        self.redis = queue.store.redis

    def lapsed(self, exclude: str | None = None) -> list[str]:
        """Ids of workers whose lease ended (checked against the server-side key, not clocks)."""
        due = [text(w) for w in self.redis.zrangebyscore(self.keys.workers(), "-inf", time.time())]
        due = [w for w in due if w != exclude]
        if not due:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker in due:
            pipe.exists(self.keys.worker(worker))
        return [w for w, alive in zip(due, pipe.execute(), strict=True) if not alive]

    def reap(self, exclude: str | None = None) -> int:
        """Give back the tasks of every lapsed worker; returns how many tasks moved."""
        moved = 0
        for worker in self.lapsed(exclude):
            moved += self.give_back(worker)
        return moved

    def owner_lapsed(self, task_id: str) -> bool:
        """Whether ``task_id`` is claimed by a worker whose lease ended."""
        owner, state = self.redis.hmget(self.keys.task(task_id), ["owner", "state"])
        if text(state) != TaskState.RUNNING or not owner:
            return False
        return not self.redis.exists(self.keys.worker(text(owner)))

    def give_back(self, worker: str, *, refund: bool = False, only: list[str] | None = None) -> int:
        """Requeue (or fail) each task ``worker`` claimed; ``refund`` keeps its attempt count.

        ``only`` limits it to those ids (a live worker giving back ids it does not hold).
        Returns how many tasks were requeued or failed.
        """
        running = self.keys.running(worker)
        moved = 0
        for raw_id in self.redis.lrange(running, 0, -1) if only is None else only:
            task_id = text(raw_id)
            key = self.keys.task(task_id)
            fields = ["name", "notify", "attempt", "max_attempts"]
            name, notify, attempt, limit = (text(v) for v in self.redis.hmget(key, fields))
            error = WorkerLost(
                f"task {task_id} in {name} was lost with its worker {worker} "
                f"after {attempt or '?'} attempt(s) (max_attempts={_limit(limit, self.queue.max_attempts)})"
            )
            payload = self.store.encode_error(key, error, "lost").fields
            outcome = text(
                self.store.scripts["recover"](
                    keys=[
                        key,
                        running,
                        self.keys.queue(name),
                        notify or self.keys.done(task_id),
                        self.keys.dead(),
                    ],
                    args=[
                        task_id,
                        worker,
                        self.queue.max_attempts,
                        repr(time.time()),
                        int(KEEP_S * 1000),
                        payload["error"],
                        payload["error_text"],
                        self._entry(task_id, name, error, worker),
                        "1" if refund else "0",
                    ],
                )
            )
            if outcome != "skipped":
                moved += 1
                logger.warning("task %s of worker %s: %s", task_id, worker, outcome)
        if not refund and only is None and not self.redis.llen(running):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.workers(), worker)
            pipe.delete(running)
            pipe.execute()
        return moved

    def dead_letter(self, task_id: str, name: str, error: BaseException, worker: str = "") -> None:
        """Keep a failed task's id and error in the dead-letter list for inspection."""
        self.redis.lpush(self.keys.dead(), self._entry(task_id, name, error, worker))
        self.redis.ltrim(self.keys.dead(), 0, 9999)

    @staticmethod
    def _entry(task_id: str, name: str, error: BaseException, worker: str) -> str:
        return dead_letter_entry(task_id, name, error, worker)

    def dead_letters(self, count: int = 100) -> list[dict[str, object]]:
        """The newest ``count`` dead-letter entries, newest first."""
        return [json.loads(text(e)) for e in self.redis.lrange(self.keys.dead(), 0, count - 1)]


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
