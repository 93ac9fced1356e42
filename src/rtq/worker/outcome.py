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

import json
import logging
import time
import traceback
from typing import Any

from ..backend.claims import Claims
from ..backend.connections import TRANSIENT
from ..backend.store import Encoded, TaskStore
from ..backoff import Backoff
from ..errors import RedisFull, SerializationError
from ..task import RedisTask, TaskState
from .recovery import dead_letter_entry
from .run import Run

__all__ = ["OutcomeWriter"]

logger = logging.getLogger("rtq.worker")


class OutcomeWriter:
    """Stores the outcomes of the tasks one worker ran.

    Args:
        store: The queue's task records.
        worker_id: The worker whose claims fence the outcomes.
    """

    def __init__(self, store: TaskStore, worker_id: str) -> None:
        self.store = store
        self.claims = Claims(store, worker_id)  # the Redis half

    def finish(self, run: Run, state: str, value: Any, *, dead_letter: bool = False) -> None:
        """Store ``task``'s outcome: ``state`` ``'done'`` with its result, or ``'failed'`` with its exception.

        A result that cannot be shipped fails the task with the ``SerializationError`` instead;
        one that Redis refuses for lack of memory fails it with :class:`RedisFull` (and
        dead-letters it). Raises connection errors only once Redis stayed away past the task's
        deadline (at least a minute).

        Args:
            run: The task's attempt, as claimed by this worker.
            state: ``'done'`` or ``'failed'``.
            value: Its result, or its exception.
            dead_letter: Also add the task to the dead-letter list, in the step that stores the
                failure (a task refused before it ran).
        """
        task = run.task
        key = self.store.keys.task(task.id)
        tag = f"a{run.attempt}"
        if state == TaskState.DONE:
            try:
                enc = self.store.encode(key, "result", value, tag, "result", expiry=task.expiry)
            except SerializationError as exc:
                state, value = TaskState.FAILED, exc
        if state == TaskState.FAILED:
            enc = self.store.encode_error(key, value, tag)
        try:
            stored = self._keep_trying(run, state, enc, value if dead_letter else None)
        except RedisFull as exc:
            # Refused whole, so nothing of it was written: fail the task with the refusal, a
            # small payload a full Redis still takes (finish.lua writes first what frees memory).
            logger.warning("%s", exc)
            state, value = TaskState.FAILED, exc
            stored = self._keep_trying(run, state, self.store.encode_error(key, exc, tag), exc)
        if not stored:
            logger.info("discarded the outcome of task %s: cancelled, expired or taken over", task.id)
        elif state == TaskState.FAILED:
            logger.info("task %s in %s failed: %s", task.id, task.name, _short(value))
            self._list_failure(task, value)

    def _list_failure(self, task: RedisTask, exc: BaseException) -> None:
        """Put a stored failure on the failures list that ``rtq dashboard`` shows (its error line only)."""
        label = getattr(task.params, "label", None)
        entry = {
            "id": task.id,
            "queue": task.name,
            "label": label if isinstance(label, str) else "",
            "error": _short(exc),
            "worker": self.claims.worker_id,
            "time": time.time(),
            # The caller usually consumes the outcome (and the record with it) at once: the
            # dashboard's "traceback on click" reads this copy.
            "traceback": _tail("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
        }
        try:
            self.claims.failed(json.dumps(entry))
        except TRANSIENT as exc_:
            logger.warning("could not list the failure of task %s (%s)", task.id, exc_)

    def _keep_trying(self, run: Run, state: str, enc: Encoded, dead: BaseException | None) -> bool:
        """Store the outcome, retried with backoff while Redis is away (restarting)."""
        task, held = run.task, run.held
        entry = dead_letter_entry(task.id, task.name, dead, self.claims.worker_id) if dead is not None else ""
        what = f"the {'result' if state == TaskState.DONE else 'exception'} of task {task.id} in {task.name}"
        give_up = max(task.expiry, time.time() + 60)
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                return self.claims.finish(held, state, enc, dead_entry=entry, what=what)
            except TRANSIENT as exc:
                delay = backoff.failed()
                if time.time() + delay > give_up:
                    raise
                logger.warning("cannot store the outcome of task %s (%s); retrying in %.1fs", task.id, exc, delay)
                time.sleep(delay)  # Redis is away: nothing to block on but the clock


def _tail(text_: str, limit: int = 8000) -> str:
    """The last ``limit`` characters of a traceback: where it was raised is at its end."""
    return text_ if len(text_) <= limit else "[...]\n" + text_[-limit:]


def _short(exc: BaseException) -> str:
    try:
        message = str(exc).strip().splitlines()
    except Exception:  # an exception whose __str__ fails is still listed, by its type
        message = []
    text_ = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return text_ if len(text_) < 200 else text_[:197] + "..."
