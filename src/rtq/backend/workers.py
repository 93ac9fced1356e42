"""WorkerRegistry as Redis sees them: leases, records, in-progress lists, queue markers, dead letters.

A worker's lease is its record key (``worker:<id>``), which expires on the Redis server's clock;
the ``workers`` sorted set only says *when to look* (its score is when the lease should end, on
the worker's clock). Its claimed ids sit in ``task-running|<id>``; its queues' markers
(``task-listen|<name>``) route ``TaskExecutePolicy.Auto`` to it. See :mod:`rtq.backend.keys`.

The decisions — when to beat, whom to reap, what to log — are the worker's
(:mod:`rtq.worker.watchdog`, :mod:`rtq.worker.recovery`); this module is their Redis half.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis as redis_py

from . import scripts
from .keys import Keys
from .store import KEEP_S, TaskStore, text

__all__ = ["DEAD_LETTERS_KEPT", "Claim", "LeaseKeeper", "Snapshot", "WorkerRegistry"]

DEAD_LETTERS_KEPT = 10_000
"""Newest dead-letter entries kept; older ones are trimmed."""


@dataclass(frozen=True)
class Claim:
    """What a record says about who runs a task (``state``, ``owner``, ``attempt``, ``token``)."""

    state: str | None
    owner: str
    attempt: str
    token: str | None


@dataclass(frozen=True)
class Snapshot:
    """What ``rtq status`` shows, as read from Redis (raw: the caller parses what it trusts).

    Attributes:
        records: Each registered worker's heartbeat record (raw JSON), None when it lapsed.
        claimed: Each worker's in-progress ids.
        fields: For each claimed id, the record fields asked for (raw, None where absent).
        queues: Each queue's length.
        dead: How many dead letters are kept.
    """

    records: dict[str, Any]
    claimed: dict[str, list[str]]
    fields: dict[str, list[Any]]
    queues: dict[str, int]
    dead: int


class WorkerRegistry:
    """The worker-side Redis operations of one queue namespace.

    Args:
        store: The namespace's task records (its bytes-returning client and scripts).
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.redis: redis_py.Redis = store.redis

    # -- leases and records ----------------------------------------------------------------
    def beat(
        self, worker_id: str, record: dict[str, Any], lease: float, markers: Sequence[str], marker_ttl: float
    ) -> None:
        """Refresh ``worker_id``'s lease and record, and mark the queues ``markers`` as listened."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.worker(worker_id), json.dumps(record), px=int(lease * 1000))
        pipe.zadd(keys.workers(), {worker_id: time.time() + lease})
        for name in markers:
            pipe.set(keys.listen(name), "1", px=int(marker_ttl * 1000))
        pipe.execute()

    def retire(self, worker_id: str, names: Sequence[str]) -> None:
        """Remove a stopping worker's record, lease and its queues' markers.

        Auto must stop routing here now; other listeners of these queues re-mark them within
        their next heartbeat.
        """
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.worker(worker_id))
        pipe.zrem(keys.workers(), worker_id)
        pipe.delete(*(keys.listen(name) for name in names))
        pipe.execute()
        self.drop_landings(worker_id)

    def lapsed(self, exclude: str | None = None) -> list[str]:
        """Ids of workers whose lease ended (checked against the server-side key, not clocks)."""
        keys = self.keys
        due = [text(w) for w in self.redis.zrangebyscore(keys.workers(), "-inf", time.time())]
        due = [w for w in due if w != exclude]
        if not due:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker in due:
            pipe.exists(keys.worker(worker))
        return [w for w, alive in zip(due, pipe.execute(), strict=True) if not alive]

    def live_records(self) -> list[dict[str, Any]]:
        """The heartbeat records (JSON-decoded) of every worker whose lease holds."""
        ids = [text(w) for w in self.redis.zrangebyscore(self.keys.workers(), time.time(), "+inf")]
        records = self.redis.mget([self.keys.worker(w) for w in ids]) if ids else []
        out = []
        for raw in records:
            if not raw:
                continue
            try:
                record = json.loads(text(raw))
            except ValueError:  # written by something else than rtq: not a worker to count
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def snapshot(self, task_fields: Sequence[str]) -> Snapshot:
        """Workers, their claims (with ``task_fields`` of each claimed task), queues, dead letters."""
        keys, redis = self.keys, self.redis
        ids = [text(w) for w in redis.zrange(keys.workers(), 0, -1)]
        records = dict(zip(ids, redis.mget([keys.worker(w) for w in ids]) if ids else [], strict=True))
        queues = {}
        for key in redis.scan_iter(match=keys.queue_pattern(), count=1000):
            queues[keys.queue_name(text(key))] = int(redis.llen(key))
        live = [w for w, raw in records.items() if raw]
        pipe = redis.pipeline(transaction=False)
        for worker in live:
            pipe.lrange(keys.running(worker), 0, -1)
        claimed = {w: [text(i) for i in ids_] for w, ids_ in zip(live, pipe.execute() if live else [], strict=True)}
        tasks = [t for ids_ in claimed.values() for t in ids_]
        pipe = redis.pipeline(transaction=False)
        for task_id in tasks:
            pipe.hmget(keys.task(task_id), list(task_fields))
        fields = dict(zip(tasks, pipe.execute() if tasks else [], strict=True))
        return Snapshot(records, claimed, fields, queues, int(redis.llen(keys.dead())))

    def is_alive(self, worker_id: str) -> bool:
        """Whether ``worker_id``'s lease holds."""
        return bool(self.redis.exists(self.keys.worker(worker_id)))

    def claimed(self, worker_id: str) -> list[str]:
        """The ids in ``worker_id``'s in-progress list."""
        return [text(i) for i in self.redis.lrange(self.keys.running(worker_id), 0, -1)]

    def land(self, worker_id: str) -> list[str]:
        """Move what ``worker_id``'s landing lists hold into its in-progress list; returns those ids.

        An id sits in a landing list only between a claim thread's blocking move and the claim
        sent with it, unless the claim never ran (the worker died, or its connection dropped,
        right between): from the in-progress list, recovery gives it back like any other.
        """
        keys, moved = self.keys, []
        running = keys.running(worker_id)
        for landing in sorted(text(k) for k in self.redis.smembers(keys.landings(worker_id))):
            while (task_id := self.redis.lmove(landing, running, "LEFT", "RIGHT")) is not None:
                moved.append(text(task_id))
        return moved

    def forget(self, worker_id: str) -> None:
        """Drop a lapsed worker from the ``workers`` set once its in-progress list is empty."""
        running = self.keys.running(worker_id)
        if self.redis.llen(running):
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.workers(), worker_id)
        pipe.delete(running)
        pipe.execute()
        self.drop_landings(worker_id)

    def drop_landing(self, worker_id: str, landing: str) -> None:
        """Forget one landing list of a worker (its thread ended), unless an id was left in it."""
        if not self.redis.llen(landing):
            self.redis.srem(self.keys.landings(worker_id), landing)

    def drop_landings(self, worker_id: str) -> None:
        """Delete a worker's landing lists and their set, those that are empty (what is left is kept)."""
        keys = self.keys
        landings = [text(k) for k in self.redis.smembers(keys.landings(worker_id))]
        if not landings:
            return
        pipe = self.redis.pipeline(transaction=False)
        for landing in landings:
            pipe.llen(landing)
        full = [k for k, n in zip(landings, pipe.execute(), strict=True) if n]
        if full:
            return
        self.redis.delete(keys.landings(worker_id), *landings)

    # -- tasks of workers ------------------------------------------------------------------
    def owner(self, task_id: str) -> tuple[str, str]:
        """``(state, owner)`` of a task, as its record says ('' for what it lacks)."""
        owner, state = self.redis.hmget(self.keys.task(task_id), ["owner", "state"])
        return text(state), text(owner)

    def claims(self, task_ids: Sequence[str]) -> list[Claim]:
        """Who runs each task now, in one round trip (the watchdog's look at its running tasks)."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hmget(self.keys.task(task_id), ["state", "owner", "attempt", "token"])
        return [
            Claim(_maybe(state), text(owner), text(attempt), _maybe(token))
            for state, owner, attempt, token in pipe.execute()
        ]

    def wake(self, notify: str, task_id: str) -> None:
        """Push ``task_id`` on its caller's list now (its data vanished: the caller finds it gone)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(notify, task_id)
        pipe.pexpire(notify, int(KEEP_S * 1000))
        pipe.execute()

    def lost_task(self, task_id: str) -> tuple[str, str, str, str, str]:
        """``(name, notify, attempt, max_attempts, session)`` of a task being given back ('' when absent)."""
        fields = ["name", "notify", "attempt", "max_attempts", "session"]
        name, notify, attempt, limit, session = (text(v) for v in self.redis.hmget(self.keys.task(task_id), fields))
        return name, notify, attempt, limit, session

    def give_back(
        self,
        task_id: str,
        worker_id: str,
        *,
        name: str,
        notify: str,
        max_attempts: int,
        error: BaseException,
        entry: str,
        refund: bool,
        never_requeue: bool = False,
    ) -> str:
        """Requeue one task of ``worker_id`` (``recover.lua``), or fail it with ``error`` for good.

        Args:
            task_id: The task.
            worker_id: The worker that held it.
            name: Its queue.
            notify: Where its end is announced ('' for its done list).
            max_attempts: The reaper's limit, for records that carry none of their own.
            error: The ``WorkerLost`` it fails with once its attempts are used up.
            entry: Its dead-letter entry (JSON) in that case.
            refund: Give the attempt back (the worker stopped on purpose; the task did not fail).
            never_requeue: Fail it with ``error`` now, whatever its attempts (a session's call).

        Returns:
            ``'requeued'``, ``'failed'``, or ``'skipped'`` when another reaper got it first.
        """
        keys, key = self.keys, self.keys.task(task_id)
        payload = self.store.encode_error(key, error, "lost").fields
        return text(
            self.store.scripts["recover"](
                keys=[key, keys.running(worker_id), keys.queue(name), notify or keys.done(task_id), keys.dead()],
                args=[
                    task_id,
                    worker_id,
                    max_attempts,
                    repr(time.time()),
                    int(KEEP_S * 1000),
                    payload["error"],
                    payload["error_text"],
                    entry,
                    "1" if refund else "0",
                    "1" if never_requeue else "0",
                ],
            )
        )

    # -- dead letters ----------------------------------------------------------------------
    def dead_letter(self, entry: str) -> None:
        """Add a dead-letter entry (JSON), keeping the newest :data:`DEAD_LETTERS_KEPT`."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.dead(), entry)
        pipe.ltrim(self.keys.dead(), 0, DEAD_LETTERS_KEPT - 1)
        pipe.execute()

    def dead_letters(self, count: int = 100) -> list[dict[str, object]]:
        """The newest ``count`` dead-letter entries, newest first."""
        return [json.loads(text(e)) for e in self.redis.lrange(self.keys.dead(), 0, count - 1)]


def _maybe(value: Any) -> str | None:
    return None if value is None else text(value)


class LeaseKeeper:
    """The heartbeat helper's beat (``heartbeat.lua``): a worker's lease kept from another process.

    Args:
        client: The helper's own client.
        keys: The worker's queue namespace.
        worker_id: The worker.
        names: The queues it marks as listened.
    """

    def __init__(self, client: redis_py.Redis, keys: Keys, worker_id: str, names: Sequence[str]) -> None:
        self.worker_id = worker_id
        self.script = scripts.load(client)["heartbeat"]
        self.keys = [keys.worker(worker_id), keys.workers(), *(keys.listen(n) for n in names)]

    def beat(self, mode: str, lease: float, marker_ttl: float, record: dict[str, Any]) -> None:
        """One beat: ``mode`` ``'serve'`` (lease and markers), ``'drain'`` (lease only) or ``'dead'``."""
        now = time.time()
        self.script(
            keys=self.keys,
            args=[
                self.worker_id,
                mode,
                max(1, int(lease * 1000)),
                repr(now + lease),
                max(1, int(marker_ttl * 1000)),
                json.dumps({**record, "beat": now}),
            ],
        )
