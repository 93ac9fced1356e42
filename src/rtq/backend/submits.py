"""The submit path: a task's record stored and its id queued, in one round trip.

Small records go through ``submit.lua`` — one at a time through the store's
:class:`~rtq.backend.batching.GroupCommit` (concurrent submitters leave together), several as one
``MULTI``/``EXEC`` of script calls, or without waiting for the reply through
:class:`~rtq.backend.batching.SendAhead` (``Executor.submit``). Big records (frames under keys of
their own, buffers by digest, or more than :data:`SCRIPT_ARGS_MAX` bytes of fields) skip Lua: a
``MULTI`` transaction of plain commands on a held connection, so their bytes are never copied
into a script. The record's layout is :mod:`rtq.backend.store`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis as redis_py

from ..task import RedisTask, TaskState
from .durability import Ack
from .encoded import LIST_FIELDS, Encoded, flatten
from .replies import raise_errors
from .routing import is_cluster

if TYPE_CHECKING:
    from .store import TaskStore

__all__ = ["SCRIPT_ARGS_MAX", "Submits"]

SCRIPT_ARGS_MAX = 256 * 1024
"""Largest record (bytes of field values) stored through ``submit.lua``; bigger ones skip Lua."""


class Submits:
    """The submit path of one :class:`~rtq.backend.store.TaskStore` (its keys, connections and scripts)."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def submit(
        self,
        tasks: Sequence[tuple[RedisTask, str, str | None]],
        *,
        listened: str | None = None,
        into: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Store and enqueue tasks in one round trip: ``(task, token, notify)`` each.

        A reused id starts clean: its old record, done list and events are replaced in the same
        atomic step, so no stale result or notification leaks into the new run. Small records
        go through ``submit.lua`` (one command per task); big ones through a MULTI transaction of
        plain commands, so big buffers are never copied into Lua (and the frames of the id's
        previous big payloads are deleted with its record).

        Args:
            tasks: What to store.
            listened: A queue name: store only if a listener marks that queue (the check and
                the enqueue are one atomic step); returns False, storing nothing, if none does.
            into: The list to queue the ids on instead of their queue's (a session's call list).
            extra: More fields for every record (``session``: the session a call is aimed at).
        """
        records = [
            (t, self.store.record(t, token=tok, state=TaskState.QUEUED, notify=n, extra=extra)) for t, tok, n in tasks
        ]
        return self._submit_records(records, listened, into)

    def _submit_records(
        self, records: list[tuple[RedisTask, Encoded]], listened: str | None, into: str | None = None
    ) -> bool:
        if any(enc.frames or enc.named or _payload_size(enc.fields) > SCRIPT_ARGS_MAX for _, enc in records):
            # One round trip first: the listener check, and the frame lists of records replaced.
            with self.store.channels.channel() as channel:
                looked = channel.pipeline(
                    [("EXISTS", self.store.keys.listen(listened or "-"))]
                    + [("HMGET", self.store.keys.task(t.id), *LIST_FIELDS) for t, _ in records]
                )
            if listened is not None and not looked[0]:
                return False
            # A buffer several tasks of the batch name (ex.map(f, parts, repeat(table))) goes once.
            blobs = list({c[1]: c for t, enc in records for c in enc.blob_commands(t.expiry)}.values())
            commands: list[tuple[Any, ...]] = [("MULTI",)]
            queueing = []  # where each record's enqueue command sits among EXEC's replies
            for (task, enc), old in zip(records, looked[1:], strict=True):
                key = self.store.keys.task(task.id)
                stale = self.store.frame_keys(key, old) if isinstance(old, list) else []
                commands += [
                    ("DEL", key, self.store.keys.done(task.id), self.store.keys.events(task.id), *stale),
                    ("HSET", key, *flatten(enc.fields)),
                    ("PEXPIREAT", key, int(task.expiry * 1000) + 1),
                    *enc.frame_commands(task.expiry),
                    self.store.blobs.enqueue(task, enc, into),
                ]
                queueing.append(len(commands) - 2)
            commands.append(("EXEC",))
            with self.store.channels.channel() as channel:  # sends the frames as they are, uncopied
                if blobs:  # first, alone: a buffer Redis refuses must stop the records naming it
                    raise_errors(channel.pipeline(blobs), _what_submit(records))
                replies = self.store.acked(channel.pipeline(self.store.with_ack(commands)), _what_submit(records))
            raise_errors(replies, _what_submit(records))
            self.store.blobs.enqueue_the_rest(records, [replies[-1][i] for i in queueing], _what_submit, into)
            return True
        script = self.store.scripts["submit"]
        calls = [self._submit_call(task, enc, listened, into) for task, enc in records]
        if len(calls) == 1:
            # Concurrent submits (a thousand threads in query()) share one connection and leave
            # together in one write, instead of taking a connection each.
            try:
                replies = [self.store.submitter.call(script, *calls[0])]
            except redis_py.ResponseError as exc:
                replies = [exc]
        else:
            with self.store.channels.channel() as channel:
                # A batch is one transaction: a connection lost before EXEC queues none of it.
                replies = self._send_batch(channel, script, calls, self.store.submit_ack)
                if any(isinstance(r, redis_py.exceptions.NoScriptError) for r in replies):
                    # The server lost its scripts (restart, flush): none ran (every call is the
                    # same script), so load it and send the batch again.
                    channel.load(script)
                    replies = self._send_batch(channel, script, calls, self.store.submit_ack)
        raise_errors(replies, _what_submit(records))
        self._unlink_replaced(records, replies)
        return all(replies)

    def submit_soon(
        self, task: RedisTask, token: str, notify: str, stored: Callable[[BaseException | None], object]
    ) -> None:
        """Store and enqueue ``task`` without waiting for Redis's answer: a submit loop batches itself.

        The task is encoded here (a ``SerializationError`` raises at once) and, when small, sent
        through :class:`~rtq.backend.batching.SendAhead`; ``stored`` is called with None once
        Redis stored it, or with the error if it did not (``RedisFull``, a lost connection), from
        another thread. A big record (out-of-band frames) is stored before this returns, after
        the calls sent ahead of it, and ``stored(None)`` is called here; so is every record of a
        durable store (its submit waits for a replica) and of a cluster's (a submit the slot's
        move refuses is sent again where the slot went).
        """
        records = [(task, self.store.record(task, token=token, state=TaskState.QUEUED, notify=notify))]
        enc = records[0][1]
        big = enc.frames or enc.named or _payload_size(enc.fields) > SCRIPT_ARGS_MAX
        if big or self.store.submit_ack is not None or is_cluster(self.store.redis):
            self.store.ahead.flush()  # in the order they were submitted
            self._submit_records(records, None)
            stored(None)
            return

        def replied(reply: Any, error: BaseException | None) -> None:
            if error is None or isinstance(error, redis_py.ResponseError):  # an error reply: said as submit says it
                try:
                    raise_errors([reply if error is None else error], _what_submit(records))
                    self._unlink_replaced(records, [reply])
                except BaseException as exc:
                    error = exc
            stored(error)

        self.store.ahead.call(self.store.scripts["submit"], *self._submit_call(task, records[0][1], None), replied)

    def _submit_call(
        self, task: RedisTask, enc: Encoded, listened: str | None, into: str | None = None
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ``submit.lua`` for one task (queued on ``into`` when given)."""
        keys = [
            self.store.keys.task(task.id),
            self.store.keys.done(task.id),
            self.store.keys.events(task.id),
            into or self.store.keys.queue(task.name),
        ]
        if listened is not None:
            keys.append(self.store.keys.listen(listened))
        return keys, [task.id, int(task.expiry * 1000) + 1, *flatten(enc.fields)]

    def _unlink_replaced(self, records: Sequence[tuple[RedisTask, Encoded]], replies: Sequence[Any]) -> None:
        """Replaced records that had big frames: submit.lua handed back their frame lists."""
        stale = [
            frame
            for (task, _), reply in zip(records, replies, strict=True)
            if isinstance(reply, list)
            for frame in self.store.frame_keys(self.store.keys.task(task.id), reply[1:])
        ]
        if stale:
            self.store.redis.unlink(*stale)

    @staticmethod
    def _send_batch(
        channel: Any, script: Any, calls: list[tuple[list[str], list[Any]]], ack: Ack | None = None
    ) -> list[Any]:
        """One MULTI/EXEC of ``script`` calls by SHA (then ``ack``'s ``WAIT``); the replies of the calls."""
        commands = [("MULTI",), *(("EVALSHA", script.sha, len(k), *k, *a) for k, a in calls), ("EXEC",)]
        if ack is not None:
            *replies, acked = channel.pipeline([*commands, ack.command])
            if isinstance(replies[-1], list) and not any(
                isinstance(r, redis_py.exceptions.NoScriptError) for r in replies[-1]
            ):
                ack.check(acked, f"a batch of {len(calls)} tasks")
        else:
            replies = channel.pipeline(commands)
        # MULTI's OK and each QUEUED, or an error queueing a call (then EXEC aborts); the calls'
        # own replies go back unchecked (a NOSCRIPT among them means: load, send again).
        *queued, result = replies
        raise_errors(queued if isinstance(result, list) else replies, f"a batch of {len(calls)} tasks")
        return list(result)


def _what_submit(records: Sequence[tuple[RedisTask, Encoded]]) -> str:
    if len(records) == 1:
        return f"task {records[0][0].id} in {records[0][0].name}"
    return f"a batch of {len(records)} tasks"


def _payload_size(fields: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, (bytes, bytearray, memoryview, str)) else 32 for v in fields.values())
