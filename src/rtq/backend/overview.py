"""What ``rtq dashboard`` reads: the whole namespace in a few pipelined round trips, read-only.

The dashboard (:mod:`rtq.web`) polls :meth:`Overview.layout` once a refresh: worker ids and
records, each live worker's in-progress list, each queue's length and head, the failures and
dead-letter lists, and the records of the sessions and actors live workers hold; it looks for
new queue names (a ``SCAN``) far less often. A task is read
in full (:meth:`Overview.tasks`, :meth:`Overview.recent`) only when it is first seen running;
after that only its new events come, for all running tasks in one non-blocking ``XREAD``
(:class:`rtq.backend.events.Events`). So the commands per refresh grow with the number of
workers and queues, not with the number of running tasks.

Nothing here reads a payload (params, result, error envelopes): only labels, progress, output
text, error text and timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .failures import error_info
from .keys import Keys
from .store import TaskStore, text

__all__ = ["Layout", "Overview"]


@dataclass(frozen=True)
class Layout:
    """One read of the namespace's structure (raw where the caller decides what to trust).

    Attributes:
        records: Each registered worker's record (raw JSON), None when its lease lapsed.
        leases: When each registered worker's lease ends (its ``workers`` score, worker's clock).
        claimed: Each live worker's in-progress ids.
        queues: Each queue's ``(length, submitted time of its head task or None)``.
        failures: The newest failures list entries (decoded JSON dicts, with their tracebacks), newest first.
        dead: The newest dead-letter entries (decoded JSON dicts), newest first.
        dead_count: How many dead letters are kept.
    """

    records: dict[str, Any]
    leases: dict[str, float]
    claimed: dict[str, list[str]]
    queues: dict[str, tuple[int, float | None]]
    failures: list[dict[str, Any]]
    dead: list[dict[str, Any]]
    dead_count: int


class Overview:
    """Read-only reads of one queue namespace for the dashboard.

    Args:
        store: The namespace's task records (its bytes-returning client).
    """

    def __init__(self, store: TaskStore) -> None:
        self.redis = store.redis
        self.keys: Keys = store.keys
        self._failures: tuple[Any, list[dict[str, Any]]] = (None, [])  # the list's head, and what it held

    def where(self) -> str:
        """``host:port/db`` of the server (never its password), for the page's header."""
        kwargs = self.redis.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix:{kwargs['path']}/{kwargs.get('db', 0)}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def queue_names(self) -> list[str]:
        """Names of the queues holding tasks now (a ``SCAN`` of the whole keyspace: call it rarely)."""
        found = self.redis.scan_iter(match=self.keys.queue_pattern(), count=1000)
        return [self.keys.queue_name(text(key)) for key in found]

    def layout(self, queue_names: Sequence[str], listed: int = 50) -> Layout:
        """Workers, claims, the queues ``queue_names``, and the newest ``listed`` failures and dead letters."""
        keys, redis = self.keys, self.redis
        pipe = redis.pipeline(transaction=False)
        pipe.zrange(keys.workers(), 0, -1, withscores=True)
        pipe.lindex(keys.failures(), 0)
        pipe.lrange(keys.dead(), 0, listed - 1)
        pipe.llen(keys.dead())
        leased, newest, dead, dead_count = pipe.execute()
        if newest != self._failures[0]:  # entries carry tracebacks: read them again only when new ones came
            self._failures = (newest, _entries(redis.lrange(keys.failures(), 0, listed - 1)))
        leases = {text(w): float(score) for w, score in leased}
        records = dict(zip(leases, redis.mget([keys.worker(w) for w in leases]) if leases else [], strict=True))
        live = [w for w, raw in records.items() if raw]
        pipe = redis.pipeline(transaction=False)
        for worker in live:
            pipe.lrange(keys.running(worker), 0, -1)
        claimed = {w: [text(i) for i in ids] for w, ids in zip(live, pipe.execute() if live else [], strict=True)}
        return Layout(
            records, leases, claimed, self.queues(queue_names), self._failures[1], _entries(dead), int(dead_count)
        )

    def queues(self, names: Sequence[str]) -> dict[str, tuple[int, float | None]]:
        """Each queue's ``(length, submitted time of its head task or None)``, in two round trips."""
        if not names:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(self.keys.queue(name))
            pipe.lindex(self.keys.queue(name), 0)
        replies = pipe.execute()
        heads = [None if head is None else text(head) for head in replies[1::2]]
        waiting = iter(self.tasks([h for h in heads if h is not None], ["submitted"]))
        return {
            name: (int(length), None if head is None else _float(next(waiting)[0]))
            for name, length, head in zip(names, replies[0::2], heads, strict=True)
        }

    def tasks(self, task_ids: Sequence[str], fields: Sequence[str]) -> list[list[Any]]:
        """``fields`` of each task (raw, None where absent), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hmget(self.keys.task(task_id), list(fields))
        return list(pipe.execute()) if task_ids else []

    def recent(self, task_ids: Sequence[str], count: int) -> list[list[tuple[Any, dict[Any, Any]]]]:
        """The newest ``count`` events of each task's stream, oldest first, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.xrevrange(self.keys.events(task_id), count=count)
        return [list(reversed(entries)) for entries in pipe.execute()] if task_ids else []

    def sessions(self, session_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """The records of these sessions and actors (text fields; {} for one gone), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hgetall(self.keys.session(session_id))
        replies = pipe.execute() if session_ids else []
        return {sid: {text(k): text(v) for k, v in raw.items()} for sid, raw in zip(session_ids, replies, strict=True)}

    def error(self, task_id: str) -> dict[str, str]:
        """A failed task's error as text (``type``, ``message``, ``traceback``), never unpickled; {} when gone."""
        raw = self.redis.hget(self.keys.task(task_id), "error_text")
        return error_info(raw) if raw else {}


def _entries(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON list entries as dicts; one that is not rtq's is left out."""
    out = []
    for entry in raw:
        try:
            value = json.loads(text(entry))
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _float(value: Any) -> float | None:
    try:
        return float(text(value)) if value is not None else None
    except ValueError:
        return None
