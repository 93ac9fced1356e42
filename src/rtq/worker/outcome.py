"""Storing a task's outcome on the worker: encoded, fenced, whole, and kept through Redis outages.

A task's result (or exception) becomes payload fields (:meth:`TaskStore.encode`); ``finish.lua``
stores them only while this worker's claim still holds (owner, attempt and submission token),
takes the id off the worker's in-progress list and wakes the caller, in one atomic step. Small
outcomes of tasks ending together share one round trip (:class:`~rtq.backend.batching.GroupCommit`).
A payload with extra frames (hash fields, or keys of their own when big) is written with
``finish.lua`` in one MULTI/EXEC transaction, in the same write: Redis stores all of it or none
of it, so a part refused for lack of memory never leaves a task done with half a result, and a
worker killed while sending a big result leaves nothing behind. A result Redis refused fails the
task with :class:`~rtq.errors.RedisFull` instead. While Redis is away (restarting) the outcome
is kept and retried with backoff, rather than leave the task running forever in a live worker's
list.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis as redis_py

from ..backend.batching import GroupCommit
from ..backend.keys import Keys
from ..backend.store import KEEP_S, Encoded, TaskStore, flatten
from ..backend.wire import Channel, raise_errors
from ..errors import RedisFull, SerializationError
from ..serialization import size_text
from ..task import RedisTask, TaskState
from .recovery import dead_letter_entry

__all__ = ["OutcomeWriter"]

logger = logging.getLogger("rtq.worker")


class OutcomeWriter:
    """Stores the outcomes of the tasks one worker ran.

    Args:
        store: The queue's task records.
        keys: The queue's key names.
        worker_id: The worker whose claims fence the outcomes.
        running_key: That worker's in-progress list.
    """

    def __init__(self, store: TaskStore, keys: Keys, worker_id: str, running_key: str) -> None:
        self.store = store
        self.keys = keys
        self.worker_id = worker_id
        self.running_key = running_key
        self.finisher = GroupCommit(store.redis)  # finish.lua calls of tasks ending together
        # Test hook: send an outcome with big frames only up to its first frame, write the task
        # id to this file, and hold the rest back until "<file>.go" exists (a test kills or
        # stops the worker there).
        self.pause_in_outcome = os.environ.get("RTQ_TEST_PAUSE_IN_OUTCOME")

    def finish(self, task: RedisTask, state: str, value: Any, *, dead_letter: bool = False) -> None:
        """Store ``task``'s outcome: ``state`` ``'done'`` with its result, or ``'failed'`` with its exception.

        A result that cannot be shipped fails the task with the ``SerializationError`` instead;
        one that Redis refuses for lack of memory fails it with :class:`RedisFull` (and
        dead-letters it). Raises connection errors only once Redis stayed away past the task's
        deadline (at least a minute).

        Args:
            task: The task, as claimed by this worker.
            state: ``'done'`` or ``'failed'``.
            value: Its result, or its exception.
            dead_letter: Also add the task to the dead-letter list, in the step that stores the
                failure (a task refused before it ran).
        """
        key = self.keys.task(task.id)
        tag = f"a{task._attempt}"  # type: ignore[attr-defined]
        if state == TaskState.DONE:
            try:
                enc = self.store.encode(key, "result", value, tag, "result")
            except SerializationError as exc:
                state, value = TaskState.FAILED, exc
        if state == TaskState.FAILED:
            enc = self.store.encode_error(key, value, tag)
        try:
            stored = self._keep_trying(task, state, enc, value if dead_letter else None)
        except RedisFull as exc:
            # Refused whole, so nothing of it was written: fail the task with the refusal, a
            # small payload a full Redis still takes (finish.lua writes first what frees memory).
            logger.warning("%s", exc)
            state, value = TaskState.FAILED, exc
            stored = self._keep_trying(task, state, self.store.encode_error(key, exc, tag), exc)
        if not stored:
            logger.info("discarded the outcome of task %s: cancelled, expired or taken over", task.id)
        elif state == TaskState.FAILED:
            logger.info("task %s in %s failed: %s", task.id, task.name, _short(value))

    def _keep_trying(self, task: RedisTask, state: str, enc: Encoded, dead: BaseException | None) -> bool:
        """:meth:`_store`, retried with backoff while Redis is away (restarting)."""
        give_up = max(task.expiry, time.time() + 60)
        backoff = 0.1
        while True:
            try:
                return self._store(task, state, enc, dead)
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                if time.time() + backoff > give_up:
                    raise
                logger.warning("cannot store the outcome of task %s (%s); retrying in %.1fs", task.id, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _store(self, task: RedisTask, state: str, enc: Encoded, dead: BaseException | None) -> bool:
        """One try at storing the outcome ``enc``; True when stored, False when fenced out.

        Raises:
            RedisFull: Redis refused it for lack of memory (none of it was written).
        """
        key = self.keys.task(task.id)
        finish = self.store.scripts["finish"]
        first, rest = _split_frames(enc.fields, ("result", "error", "error_text"))
        notify: str = task._notify  # type: ignore[attr-defined]
        keys = [key, self.running_key, notify, self.keys.events(task.id), self.keys.dead(), *enc.frames]
        args = [
            task.id,
            self.worker_id,
            str(task._attempt),  # type: ignore[attr-defined]
            state,
            repr(time.time()),
            int(KEEP_S * 1000),
            getattr(task, "_token", ""),  # fences out a run of an earlier submission of this id
            dead_letter_entry(task.id, task.name, dead, self.worker_id) if dead is not None else "",
            *flatten(first),
        ]
        what = f"the {'result' if state == TaskState.DONE else 'exception'} of task {task.id} in {task.name}"
        if not rest and not enc.frames:
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
        commands += enc.frame_commands(task.expiry)
        commands += [("EVAL", finish.script, len(keys), *keys, *args), ("EXEC",)]
        payload = [*enc.fields.values(), *enc.frames.values()]
        size = sum(memoryview(v).nbytes for v in payload if isinstance(v, (bytes, bytearray, memoryview)))
        with self.store.channels.channel() as channel:
            if self.pause_in_outcome and enc.frames:
                replies = self._pause_for_tests(channel, commands, task.id)
            else:
                replies = channel.pipeline(commands)
        raise_errors(replies, f"{what} ({size_text(size)})")
        return bool(replies[-1][-1])

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
            time.sleep(0.01)
        return replies + channel.pipeline(commands[upto:])


def _split_frames(fields: dict[str, Any], small: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {k: v for k, v in fields.items() if k in small or k.endswith("#")}
    rest = {k: v for k, v in fields.items() if k not in first}
    return first, rest


def _short(exc: BaseException) -> str:
    text_ = f"{type(exc).__name__}: {exc}"
    return text_ if len(text_) < 200 else text_[:197] + "..."
