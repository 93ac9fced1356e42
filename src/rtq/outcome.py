"""Storing a task's outcome on the worker: encoded, fenced, and kept through Redis outages.

A task's result (or exception) becomes payload fields (:meth:`TaskStore.encode`); ``finish.lua``
stores them only while this worker's claim still holds (owner, attempt and submission token),
takes the id off the worker's in-progress list and wakes the caller, in one atomic step. Small
outcomes of tasks ending together share one round trip (:class:`~rtq.batching.GroupCommit`); a
result's extra frames (hash fields, or keys of their own when big) are written in the same write
as ``finish.lua``. While Redis
is away (restarting) the outcome is kept and retried with backoff, rather than leave the task
running forever in a live worker's list.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis as redis_py

from .batching import GroupCommit
from .errors import SerializationError
from .fastpath import call_script
from .keys import Keys
from .store import KEEP_S, TaskStore, flatten
from .task import RedisTask

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

    def finish(self, task: RedisTask, state: str, value: Any) -> None:
        """Store ``task``'s outcome: ``state`` ``'done'`` with its result, or ``'failed'`` with its exception.

        A result that cannot be shipped fails the task with the ``SerializationError`` instead.
        Raises connection errors only once Redis stayed away past the task's deadline (at least
        a minute).
        """
        key = self.keys.task(task.id)
        attempt = str(task._attempt)  # type: ignore[attr-defined]
        tag = f"a{attempt}"
        if state == "done":
            try:
                enc = self.store.encode(key, "result", value, tag, "result")
            except SerializationError as exc:
                state, value = "failed", exc
        if state == "failed":
            enc = self.store.encode_error(key, value, tag)
        first, rest = _split_frames(enc.fields, ("result", "error", "error_text"))
        # Big frames: SET under their own keys; their attempt tag keeps them fenced too.
        rest_commands = [("HSET", key, *flatten(rest))] if rest else []
        rest_commands += enc.frame_commands(task.expiry)
        # Redis away (restarting): keep the outcome and retry with backoff, rather than leave
        # the task running forever in a live worker's list.
        give_up = max(task.expiry, time.time() + 60)
        backoff = 0.1
        while True:
            try:
                stored = self._store(task, key, attempt, state, first, rest_commands)
                break
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                if time.time() + backoff > give_up:
                    raise
                logger.warning("cannot store the outcome of task %s (%s); retrying in %.1fs", task.id, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if not stored:
            logger.info("discarded the outcome of task %s: cancelled, expired or taken over", task.id)
        elif state == "failed":
            logger.info("task %s in %s failed: %s", task.id, task.name, _short(value))

    def _store(
        self, task: RedisTask, key: str, attempt: str, state: str, first: dict[str, Any], rest: list[tuple[Any, ...]]
    ) -> bool:
        finish = self.store.scripts["finish"]
        keys = [key, self.running_key, task._notify, self.keys.events(task.id)]  # type: ignore[attr-defined]
        args = [
            task.id,
            self.worker_id,
            attempt,
            state,
            repr(time.time()),
            int(KEEP_S * 1000),
            getattr(task, "_token", ""),  # fences out a run of an earlier submission of this id
            *flatten(first),
        ]
        if not rest:
            # Tasks ending together share one round trip (a lone one is sent at once).
            return bool(self.finisher.call(finish, keys=keys, args=args))
        # The extra frames are written as they are (uncopied), in the same write as finish.lua,
        # which deletes the record again if it had vanished (flush, restart) and an HSET of small
        # frames re-created it with those alone.
        with self.store.channels.channel() as channel:
            *written, stored = channel.pipeline([*rest, ("EVALSHA", finish.sha, len(keys), *keys, *args)])
            if isinstance(stored, redis_py.exceptions.NoScriptError):  # a restarted or flushed server
                stored = call_script(channel, finish, keys, args)
        for reply in (*written, stored):
            if isinstance(reply, Exception):
                raise reply
        return bool(stored)


def _split_frames(fields: dict[str, Any], small: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {k: v for k, v in fields.items() if k in small or k.endswith("#")}
    rest = {k: v for k, v in fields.items() if k not in first}
    return first, rest


def _short(exc: BaseException) -> str:
    text_ = f"{type(exc).__name__}: {exc}"
    return text_ if len(text_) < 200 else text_[:197] + "..."
