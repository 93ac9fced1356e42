"""Sessions and actors as Redis sees them: one record per session, one call list per session.

A session (a ``%%rtq --session`` namespace, or an actor) lives in one worker process. Its
record, ``session:<sid>``, says where (worker id, host, pid, GPUs), since when, when it was last
used, the names it holds, and whether it is ``open`` or ``closed`` (with the reason). Calls to it
are queued on ``session-queue|<worker>|<sid>``, a list only that worker process serves. See
:mod:`rtq.backend.keys`.

The decisions — when a session is lost, what to tell the caller — are the worker's
(:mod:`rtq.worker.sessions`) and the client's (:mod:`rtq.sessions`); this module is their
Redis half.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis as redis_py

from .keys import Keys
from .store import TaskStore, text

__all__ = ["CLOSED", "CLOSED_KEEP_S", "OPEN", "SessionRecords", "SessionState", "died_reason"]

OPEN = "open"
CLOSED = "closed"
CLOSED_KEEP_S = 86_400.0
"""Seconds a closed session's record (its reason) stays readable: a notebook back the next day still learns why."""


def died_reason(worker: str, host: str) -> str:
    """Why a session whose worker's lease lapsed is lost (the words the worker side and callers share)."""
    return f"worker died: its worker {worker} on {host or '?'} lost its lease (killed, crashed, or cut off from Redis)"


@dataclass(frozen=True)
class SessionState:
    """What a session's record says, and whether its worker's lease holds, read together.

    Attributes:
        record: The record's fields (text), {} when it is gone.
        alive: Whether the worker named in the record (or the one asked about) holds its lease.
    """

    record: dict[str, str]
    alive: bool

    @property
    def state(self) -> str:
        return self.record.get("state", "")

    @property
    def reason(self) -> str:
        return self.record.get("reason", "")

    @property
    def names(self) -> list[list[Any]]:
        """The held names as ``[name, type, bytes]`` triples (as the worker last wrote them)."""
        return self._triples("names")

    @property
    def results(self) -> list[list[Any]]:
        """The large call results held for their callers, as ``[task id, type, bytes]`` triples."""
        return self._triples("results")

    def _triples(self, field: str) -> list[list[Any]]:
        try:
            rows = json.loads(self.record.get(field) or "[]")
        except ValueError:
            return []
        return [n for n in rows if isinstance(n, list) and len(n) == 3] if isinstance(rows, list) else []


class SessionRecords:
    """The session records and call lists of one queue namespace.

    Args:
        store: The namespace's task records (its bytes-returning client).
    """

    def __init__(self, store: TaskStore) -> None:
        self.keys: Keys = store.keys
        self.redis: redis_py.Redis = store.redis

    def open(self, session_id: str, fields: dict[str, Any], ttl: float) -> None:
        """Write a new session's record (it lives ``ttl`` seconds unless touched)."""
        key = self.keys.session(session_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={**{k: _str(v) for k, v in fields.items()}, "state": OPEN})
        pipe.pexpire(key, int(ttl * 1000))
        pipe.execute()

    def touch(self, session_id: str, fields: dict[str, Any], ttl: float) -> None:
        """Update an open session's record (last use, names held) and give it ``ttl`` more seconds."""
        key = self.keys.session(session_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={k: _str(v) for k, v in fields.items()})
        pipe.pexpire(key, int(ttl * 1000))
        pipe.execute()

    def close(self, session_id: str, reason: str, *, only_if_open: bool = False) -> bool:
        """Mark a session closed with ``reason`` (kept :data:`CLOSED_KEEP_S`); drop its call list.

        With ``only_if_open`` a record already closed keeps its first reason (the one that
        counts: a worker that died, then its caller noticing). Returns whether it was marked.
        """
        key = self.keys.session(session_id)
        if only_if_open:
            state = self.redis.hget(key, "state")
            if state is not None and text(state) == CLOSED:
                return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": CLOSED, "reason": reason, "closed": repr(time.time())})
        pipe.pexpire(key, int(CLOSED_KEEP_S * 1000))
        pipe.execute()
        return True

    def state(self, session_id: str, worker_id: str) -> SessionState:
        """The record of ``session_id`` and whether ``worker_id`` holds its lease (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.session(session_id))
        pipe.exists(self.keys.worker(worker_id))
        raw, alive = pipe.execute()
        return SessionState({text(k): text(v) for k, v in raw.items()}, bool(alive))

    def states(self, sessions: list[tuple[str, str]]) -> list[SessionState]:
        """:meth:`state` of several ``(session_id, worker_id)`` pairs, in one round trip."""
        if not sessions:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for session_id, worker_id in sessions:
            pipe.hgetall(self.keys.session(session_id))
            pipe.exists(self.keys.worker(worker_id))
        replies = pipe.execute()
        return [
            SessionState({text(k): text(v) for k, v in raw.items()}, bool(alive))
            for raw, alive in zip(replies[::2], replies[1::2], strict=True)
        ]

    def label(self, session_id: str) -> tuple[str, str]:
        """``(label, host)`` of a session ('' for what its record lacks)."""
        label, host = self.redis.hmget(self.keys.session(session_id), ["label", "host"])
        return text(label), text(host)

    def drop_list(self, key: str) -> None:
        """Delete a call list nobody serves any more (a closed session's, a stopped worker's opens)."""
        self.redis.delete(key)


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)
