"""A worker's writes to the tasks it holds, fenced by its claim: the Redis half of the worker.

Every write names the claim it was made under (the worker, the attempt, the submission token);
the scripts refuse a write whose claim no longer holds, so a worker that was taken over, or a
run of an earlier submission of the same id, can never overwrite a newer run's record.

``take``: a worker takes an id from a queue in one atomic step (``BLMOVE``), so an id is never
held only in memory, and ``claim.lua`` makes it the worker's (owner, attempt) and hands over its
data, both in one write: the server runs the claim right after the move returns. With free
slots, the same round trip moves more ids, claimed together next. ``move`` and ``claim`` do the
same in two round trips (a session's calls). ``progress`` and ``output`` are a running task's reports.

``finish``: a small outcome goes through ``finish.lua`` alone, batched with the outcomes of
tasks ending together (:class:`~rtq.backend.batching.GroupCommit`); one with extra frames (hash
fields, or keys of their own when big) is written with ``finish.lua`` in one MULTI/EXEC
transaction, in the same write: Redis stores all of it or none of it, so a part refused for lack
of memory never leaves a task done with half a result, and a worker killed while sending a big
result leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_py

from ..serialization import size_text
from .batching import GroupCommit
from .keys import Keys
from .replies import raise_errors
from .store import EVENTS_MAXLEN, KEEP_S, Encoded, TaskStore, flatten, text
from .wire import Channel, call_script

__all__ = ["FAILURES_KEPT", "Claims", "Held", "output_writer"]

FAILURES_KEPT = 100
"""Newest entries of the failures list (``task-failed``) kept; older ones are trimmed."""


@dataclass(frozen=True)
class Held:
    """One claim a worker holds: which task, under which attempt and submission, announced where."""

    task_id: str
    name: str
    attempt: int
    token: str
    notify: str
    expiry: float


class Claims:
    """The fenced writes of one worker.

    Args:
        store: The namespace's task records.
        worker_id: The worker whose claims fence the writes.
    """

    def __init__(self, store: TaskStore, worker_id: str) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.worker_id = worker_id
        self.running_key = store.keys.running(worker_id)
        self.finisher = GroupCommit(store.redis, ack=store.outcome_ack)  # finish.lua calls of tasks ending together
        # Test hook: send an outcome with big frames only up to its first frame, write the task
        # id to this file, and hold the rest back until "<file>.go" exists (a test kills or
        # stops the worker there).
        self.pause_in_outcome = os.environ.get("RTQ_TEST_PAUSE_IN_OUTCOME")

    # -- claiming --------------------------------------------------------------------------
    def move(self, channel: Channel, queue: str, wait: float) -> str | None:
        """Move the next id of queue ``queue`` into this worker's list, waiting up to ``wait`` s."""
        return self.move_from(channel, self.keys.queue(queue), wait)

    def move_from(self, channel: Channel, key: str, wait: float) -> str | None:
        """Move the next id of the list ``key`` (a queue, a session's calls) into this worker's list."""
        moved = channel.execute("BLMOVE", key, self.running_key, "LEFT", "RIGHT", max(0.01, wait))
        return None if moved is None else text(moved)

    def claim(
        self, channel: Channel, task_id: str, queue: str, more: int, on_moved: Callable[[list[str]], object]
    ) -> list[tuple[str, Any]]:
        """Claim ``task_id`` (just moved into this worker's list) and up to ``more`` ids still queued.

        Two round trips at most: ``claim.lua`` claims the first id and moves up to ``more``
        others from the queue into the worker's list (atomically), then those are claimed
        together in one pipeline. ``on_moved`` is told the further ids as soon as they are known
        (the worker holds them from then on). Returns ``(id, claim)`` for each, in queue order: a claim is
        ``[attempt, token, expiry, params, params#, name, notify]`` (raw, as written by whoever
        can write to Redis), False (cancelled: skipped), the reason it was dead-lettered
        (bytes), or the exception that claim raised.
        """
        keys_ = self.keys
        keys = [keys_.task(task_id), self.running_key, keys_.dead(), keys_.queue(queue)]
        first, extra, _ = call_script(
            channel, self.store.scripts["claim"], keys, [task_id, self.worker_id, repr(time.time()), queue, more]
        )
        return self._with_extra(channel, task_id, first, extra, queue, on_moved)

    def take(
        self,
        channel: Channel,
        source: str,
        queue: str,
        landing: str,
        wait: float,
        more: int,
        on_moved: Callable[[list[str]], object],
        *,
        register: bool = False,
    ) -> list[tuple[str, Any]]:
        """Wait up to ``wait`` s for the next id of the list ``source`` and claim it, in one round trip.

        ``source`` is queue ``queue``'s list, or a session's calls (``queue`` names their queue, or
        is ''). One write carries the blocking move (``BLMOVE`` into the thread's own ``landing`` list)
        and ``claim.lua``, which the server runs right after the move returns: the id goes on into
        this worker's list and is claimed with no round trip in between, and up to ``more`` queued
        ids are moved too (claimed next, as :meth:`claim` does). ``register`` adds ``landing`` to
        the worker's set of landing lists in the same write (its first use), so that recovery finds
        an id left there by a worker that died between the two. Returns what :meth:`claim` does;
        ``[]`` when nothing came.
        """
        script, keys_ = self.store.scripts["claim"], self.keys
        keys = [keys_.task(""), self.running_key, keys_.dead(), source, landing]
        args = ["", self.worker_id, repr(time.time()), queue, more]
        commands: list[tuple[Any, ...]] = [("SADD", keys_.landings(self.worker_id), landing)] if register else []
        commands += [
            ("BLMOVE", source, landing, "LEFT", "RIGHT", max(0.01, wait)),
            ("EVALSHA", script.sha, len(keys), *keys, *args),
        ]
        *before, reply = channel.pipeline(commands)
        if isinstance(reply, redis_py.exceptions.NoScriptError):  # Redis restarted or flushed
            reply = call_script(channel, script, keys, args)  # claims what the move landed
        elif isinstance(reply, Exception):
            raise reply
        first, extra, task_id = reply
        if not task_id:
            raise_errors(before, f"waiting on {source}")  # the move failed (a wrong type…)
            return []
        return self._with_extra(channel, text(task_id), first, extra, queue, on_moved)

    def _with_extra(
        self, channel: Channel, task_id: str, first: Any, extra: list[Any], queue: str, on_moved: Callable[..., object]
    ) -> list[tuple[str, Any]]:
        """``(task_id, first)``, then the claims of the ``extra`` ids claim.lua moved (one pipeline)."""
        script, keys_, dead = self.store.scripts["claim"], self.keys, self.keys.dead()
        extra = [text(i) for i in extra]
        on_moved(extra)
        claims: list[tuple[str, Any]] = [(task_id, first)]
        if extra:
            now = repr(time.time())
            replies = channel.pipeline(
                [
                    ("EVALSHA", script.sha, 3, keys_.task(i), self.running_key, dead, i, self.worker_id, now, queue)
                    for i in extra
                ]
            )
            for i, reply in zip(extra, replies, strict=True):
                if isinstance(reply, redis_py.exceptions.NoScriptError):  # Redis restarted or flushed
                    try:  # that claim never ran: load the script, claim it again
                        reply = call_script(
                            channel, script, [keys_.task(i), self.running_key, dead], [i, self.worker_id, now, queue]
                        )
                    except redis_py.RedisError as exc:
                        reply = exc
                claims.append((i, reply if isinstance(reply, Exception) else reply[0]))
        return claims

    def listed(self) -> list[str]:
        """The ids in this worker's in-progress list."""
        return [text(i) for i in self.store.redis.lrange(self.running_key, 0, -1)]

    # -- a running task's reports ----------------------------------------------------------
    def progress(self, held: Held, progress: str) -> str | None:
        """``progress.lua``: record ``"current total time"`` and push it to watchers.

        Returns the task's state, ``'lost'`` when another claim owns it now, or None when its
        data is gone ('cancelled' and 'lost' tell the running task to stop).
        """
        keys = [self.keys.task(held.task_id), self.keys.events(held.task_id)]
        args = [self.worker_id, str(held.attempt), progress, EVENTS_MAXLEN, held.token]
        state = self.store.scripts["progress"](keys=keys, args=args)
        return text(state) if state is not None else None

    # -- the end ---------------------------------------------------------------------------
    def finish(self, held: Held, state: str, enc: Encoded, *, dead_entry: str = "", what: str = "") -> bool:
        """Store an outcome ``enc`` (``state`` ``done`` or ``failed``); True when stored, False when fenced out.

        Args:
            held: The claim it is stored under.
            state: ``'done'`` or ``'failed'``.
            enc: The encoded result or exception (:meth:`TaskStore.encode`).
            dead_entry: A dead-letter entry (JSON) added in the same step, or ''.
            what: What the outcome is, for the error when Redis refuses it.

        Raises:
            RedisFull: Redis refused it for lack of memory (none of it was written).
            redis.ConnectionError: Redis is away (the caller retries).
        """
        keys_, task_id = self.keys, held.task_id
        key = keys_.task(task_id)
        finish = self.store.scripts["finish"]
        first, rest = _split_frames(enc.fields, ("result", "error", "error_text"))
        keys = [key, self.running_key, held.notify, keys_.events(task_id), keys_.dead(), *enc.frames]
        args = [
            task_id,
            self.worker_id,
            str(held.attempt),
            state,
            repr(time.time()),
            int(KEEP_S * 1000),
            held.token,  # fences out a run of an earlier submission of this id
            dead_entry,
            *flatten(first),
        ]
        if not rest and not enc.frames and not enc.blobs:
            # Tasks ending together share one round trip (a lone one is sent at once).
            try:
                return bool(self.finisher.call(finish, keys=keys, args=args))
            except redis_py.ResponseError as exc:
                raise_errors([exc], what)
                raise
        # The extra frames go as they are (uncopied) in one transaction with finish.lua, which
        # then finds the record still this attempt's, or deletes them again. EVAL, not EVALSHA:
        # a NOSCRIPT would only show once the frames were written, and the script's text is
        # nothing next to them.
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if rest:
            commands.append(("HSET", key, *flatten(rest)))
        commands += enc.frame_commands(held.expiry)
        named = enc.named
        if named:  # were they all still there when the outcome went in? (see below)
            commands.append(("EVAL", self.store.scripts["touch"].script, len(named), *named, 1))
        commands += [("EVAL", finish.script, len(keys), *keys, *args), ("EXEC",)]
        payload = [*enc.fields.values(), *enc.frames.values(), *(b for ref, b, _ in enc.blobs if ref.name in enc.send)]
        size = sum(memoryview(v).nbytes for v in payload if isinstance(v, (bytes, bytearray, memoryview)))
        ack = self.store.outcome_ack
        if ack is not None:
            commands.append(ack.command)
        with self.store.channels.channel() as channel:
            blobs = enc.blob_commands(held.expiry)
            if blobs:  # first, alone: a buffer Redis refuses must stop the outcome naming it
                raise_errors(channel.pipeline(blobs), f"{what} ({size_text(size)})")
            if self.pause_in_outcome and enc.frames:
                replies = self._pause_for_tests(channel, commands, task_id)
            else:
                replies = channel.pipeline(commands)
        if ack is not None:
            ack.check(replies.pop(), what)
        raise_errors(replies, f"{what} ({size_text(size)})")
        if named and not all(replies[-1][-2]):
            # A buffer Redis held when asked vanished before the transaction (evicted, deleted):
            # send it now, so the caller finds it. (Expiry cannot do this: asking kept it.)
            flags = iter(replies[-1][-2])
            gone = [blob for blob in enc.blobs if not all([next(flags) for _ in blob[2]])]
            resend = Encoded({}, blobs=gone, send={ref.name for ref, _, _ in gone})
            with self.store.channels.channel() as channel:
                raise_errors(channel.pipeline(resend.blob_commands(held.expiry)), what)
        return bool(replies[-1][-1])

    def failed(self, entry: str) -> None:
        """Add a failed task's entry (JSON: id, queue, label, error line, worker, time, traceback) to the failures list.

        For displays only (``rtq dashboard``): sent after the outcome, apart from it, so a
        worker dying in between loses an entry of this list, never the outcome.
        """
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.failures(), entry)
        pipe.ltrim(self.keys.failures(), 0, FAILURES_KEPT - 1)
        pipe.execute()

    def _pause_for_tests(self, channel: Channel, commands: list[tuple[Any, ...]], task_id: str) -> list[Any]:
        """Send ``commands`` up to the first big frame, the rest only once ``<hook file>.go`` exists.

        Meanwhile a test kills or stops the worker. Returns the replies of all of them.
        """
        path = str(self.pause_in_outcome)
        upto = next(i for i, command in enumerate(commands) if command[0] == "SET") + 1
        replies = channel.pipeline(commands[:upto])
        with open(path, "a") as fh:
            fh.write(f"{task_id}\n")
        while not os.path.exists(f"{path}.go"):
            time.sleep(0.01)  # a test hook waiting on a file the test writes
        return replies + channel.pipeline(commands[upto:])


def output_writer(
    store: TaskStore, task_id: str, worker_id: str = "", attempt: str = "", token: str = ""
) -> Callable[[list[str]], int]:
    """A function sending ``kind, text, kind, text …`` to a task's events (``output.lua``).

    Fenced by the claim (``worker_id``, ``attempt``, ``token``); unfenced with ''. It returns how
    many entries were added (0 when the task's data is gone or another claim owns it now).
    """
    script = store.scripts["output"]
    keys = [store.keys.task(task_id), store.keys.events(task_id)]
    head = [worker_id, attempt, token, EVENTS_MAXLEN]

    def send(entries: list[str]) -> int:
        return int(script(keys=keys, args=[*head, *entries]) or 0)

    return send


def _split_frames(fields: dict[str, Any], small: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {k: v for k, v in fields.items() if k in small or k.endswith("#")}
    rest = {k: v for k, v in fields.items() if k not in first}
    return first, rest
