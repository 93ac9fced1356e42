"""The seed API: ``RedisTaskQueue``, ``RedisTask`` and ``TaskExecutePolicy``.

``query()`` runs a task here (with ``task_fn``) or on a listener somewhere else, chosen by a
:class:`TaskExecutePolicy`. A remote caller stores the task in one hash, pushes its id on the
queue's list, and then blocks on the task's *done list*, which the worker pushes to when the
task ends: the caller wakes the moment its task finishes, and ``interval`` only bounds how long
one blocking call lasts before the caller re-checks that the task still exists.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from threading import Event
from typing import Any

import redis as redis_py

from .errors import RtqConnectionError, TaskCancelled, TaskLost, TaskTimeout
from .keys import Keys, check_name
from .recovery import Reaper
from .serialization import DEFAULT_MAX_PAYLOAD, Serializer
from .store import KEEP_S, OUTCOME_FIELDS, TaskStore, text
from .task import RedisTask, TaskExecutePolicy, running

__all__ = ["RedisTask", "RedisTaskQueue", "TaskExecutePolicy"]

logger = logging.getLogger(__name__)


class RedisTaskQueue:
    """A distributed task queue on Redis lists and hashes.

    Args:
        redis: The client to use; made with or without ``decode_responses=True``.
        prefix: First part of every key name.
        suffix: Second part of every key name.
        timeout: Default deadline of a task in seconds; also the lifetime of listener markers.
        interval: Longest a single blocking Redis call waits (seconds) before re-checking stop
            events and task existence; it never delays a result.
        task_fn: Runs a :class:`RedisTask` here (locally, and in :meth:`listen`).
        secret: Sign every payload with HMAC-SHA256 and refuse unsigned or forged ones; several
            secrets (a list, or ``"new,old"``) are accepted for rotation, the first signs.
            Defaults to the ``RTQ_SECRET`` environment variable.
        max_payload: Largest payload in bytes a task may ship.
        max_attempts: How many workers may claim a task before it fails with ``WorkerLost``; stored
            with each task this queue submits, and applied to it by whichever process reaps it.
    """

    def __init__(
        self,
        redis: redis_py.Redis,
        prefix: str,
        suffix: str = "task-queue",
        timeout: float = 300,
        interval: float = 5,
        task_fn: Callable[[RedisTask], Any] | None = None,
        *,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_attempts: int = 3,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")
        self.redis = redis
        self.prefix = prefix
        self.suffix = suffix
        self.timeout = timeout
        self.interval = interval
        self.task_fn = task_fn
        self.max_attempts = max_attempts
        self.keys = Keys(prefix, suffix)
        if secret is None:
            secret = os.environ.get("RTQ_SECRET") or None
        self.serializer = Serializer(secret, max_payload=max_payload)
        self.store = TaskStore(redis, self.keys, self.serializer, max_attempts=max_attempts)
        self.reaper = Reaper(self)

    def __repr__(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"<RedisTaskQueue {where} prefix={self.prefix!r} suffix={self.suffix!r}>"

    @property
    def signed(self) -> bool:
        """Whether payloads are signed (and unsigned ones refused)."""
        return self.serializer.signed

    # -- records ---------------------------------------------------------------------------
    def build_task(self, id: str, name: str, params: Any) -> RedisTask:
        """A new task due within the queue's ``timeout``, whose ``save()`` stores it here."""
        check_name("task id", id)
        check_name("queue name", name)
        task = RedisTask(id=id, name=name, params=params, expiry=time.time() + self.timeout)
        task._save = lambda: self.set_task(task)
        return task

    def set_task(self, task: RedisTask) -> str:
        """Store ``task`` as it is now; returns its id."""
        with _wrap_connection_errors():
            self.store.write(task)
        return task.id

    def get_task(self, id: str, once: bool = False) -> RedisTask | None:
        """The stored task (with its progress, result or error), or None when there is none.

        Args:
            id: The task id.
            once: Delete the task's data after reading it.
        """
        with _wrap_connection_errors():
            task = self.store.read(text(id), once=once)
        if task is not None:
            task._save = lambda: self.set_task(task)
        return task

    def has_task(self, id: str) -> bool:
        """Whether data for task ``id`` is stored."""
        with _wrap_connection_errors():
            return bool(self.store.redis.exists(self.keys.task(text(id))))

    # -- listeners -------------------------------------------------------------------------
    def set_queue_listened(self, name: str) -> None:
        """Mark queue ``name`` as listened for the next ``timeout`` seconds."""
        check_name("queue name", name)
        with _wrap_connection_errors():
            self.store.redis.set(self.keys.listen(name), "1", px=int(self.timeout * 1000))

    def is_listened(self, name: str) -> bool:
        """Whether a listener marked queue ``name`` within the last ``timeout`` seconds."""
        with _wrap_connection_errors():
            return bool(self.store.redis.exists(self.keys.listen(name)))

    def listen(self, names: Sequence[str], workers: int = 128, event: Event | None = None) -> None:
        """Serve the queues ``names`` with ``task_fn`` until ``event`` is set.

        Up to ``workers`` tasks run at once in threads; a task id is claimed only when a slot is
        free, and it is moved atomically into this listener's in-progress list, so a crash never
        loses it. Listener markers are set at once and kept fresh while every slot is busy.
        Returns within about ``interval`` seconds after ``event`` is set, once running tasks end.
        """
        from .listener import Listener

        if self.task_fn is None:
            raise ValueError("listen() needs a task_fn to run the tasks it takes")
        if isinstance(names, str):
            names = [names]
        Listener(self, list(names), workers=workers, event=event).run()

    # -- running ---------------------------------------------------------------------------
    def execute_task_locally(self, task: RedisTask, timeout: float | None = None) -> Any:
        """Run ``task`` here with ``task_fn`` and store its outcome; returns its result."""
        if self.task_fn is None:
            raise ValueError(f"cannot run task {task.id} locally: this queue has no task_fn")
        if timeout is not None:
            task.expiry = time.time() + timeout
        try:
            with running(task):
                task.result = self.task_fn(task)
            return task.result
        except Exception as exc:
            task.error = exc
            raise
        finally:
            try:
                self.store.write(task, state="failed" if task.error is not None else "done")
            except Exception:  # the local result matters more than its copy in Redis
                logger.warning("could not store the outcome of local task %s", task.id, exc_info=True)

    def execute_task_remotely(self, task: RedisTask, timeout: float | None = None, once: bool = False) -> Any:
        """Queue ``task`` for a listener and wait until it ends; returns its result.

        Raises:
            rtq.errors.TaskTimeout: The deadline passed first (also a ``TimeoutError``).
            rtq.errors.TaskLost: The task's data vanished from Redis while waiting.
            Exception: Whatever the task raised, re-raised as its own type.
        """
        self.submit(task, timeout=timeout)
        return self.wait(task, once=once)

    def submit(
        self, task: RedisTask, *, timeout: float | None = None, notify: str | None = None, if_listened: bool = False
    ) -> str | None:
        """Store and enqueue ``task`` without waiting; returns its submission token.

        With ``if_listened``, only when a listener marks the task's queue (checked in the same
        atomic step); returns None, storing nothing, when none does.
        """
        if timeout is not None:
            task.expiry = time.time() + timeout
        token = uuid.uuid4().hex
        with _wrap_connection_errors():
            queued = self.store.submit([(task, token, notify)], listened=task.name if if_listened else None)
        return token if queued else None

    def wait(self, task: RedisTask, *, once: bool = False) -> Any:
        """Block until ``task`` (already submitted) ends; returns its result or raises its error."""
        store, done, key = self.store, self.keys.done(task.id), self.keys.task(task.id)
        backoff = 0.0
        while True:
            remaining = task.expiry - time.time()
            if remaining <= 0:
                self._cancel_quietly(task.id)
                raise TaskTimeout(f"Task {task.id} in {task.name} has expired")
            try:
                # The outcome is read in the wake-up's round trip: the server runs the HMGET
                # right after the BLPOP returns (when the task ended, or at the timeout).
                with store.channels.channel() as channel:
                    woke, values = channel.pipeline(
                        [
                            ("BLPOP", done, max(0.01, min(remaining, self.interval, store.cap))),
                            ("HMGET", key, *OUTCOME_FIELDS),
                        ]
                    )
                for reply in (woke, values):
                    if isinstance(reply, Exception):
                        raise reply
                if woke is None:
                    try:
                        state, _ = store.outcome(task.id, values)  # raises TaskLost when the data vanished
                    except TaskLost:
                        # The data expires with the deadline: at (or, with clock skew, just
                        # before) it, a vanished task timed out; the loop top raises TaskTimeout.
                        if time.time() >= task.expiry - 1.0:
                            continue
                        raise
                    if state == "running" and self.reaper.owner_lapsed(task.id):
                        self.reaper.reap()
                    if state in ("queued", "running"):
                        continue
                state, value = store.outcome(task.id, values)
                if once:
                    store.discard(task.id)
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                # Redis restarting: keep waiting (with backoff) until it is back or the deadline.
                backoff = min(max(backoff * 2, 0.1), 2.0, max(remaining, 0.01))
                logger.warning("lost Redis while waiting for task %s (%s); retrying in %.1fs", task.id, exc, backoff)
                time.sleep(backoff)
                continue
            backoff = 0.0
            if state == "done":
                return value
            if state == "failed":
                raise value
            if state == "cancelled":
                raise TaskCancelled(f"Task {task.id} in {task.name} was cancelled")

    def _cancel_quietly(self, id: str) -> None:
        try:
            self.cancel(id)
        except Exception:  # the timeout is the error to report, not a failed clean-up
            logger.debug("could not cancel expired task %s", id, exc_info=True)

    def cancel(self, id: str, *, running: bool = True) -> str | None:
        """Cancel task ``id``: a queued task never runs; a running one stops at its next update.

        Args:
            id: The task id.
            running: Also stop the task when it already runs (else only a queued one is cancelled).

        Returns the state it was in (``'queued'``, ``'running'``, a final state, or None when the
        task is unknown).
        """
        key = self.keys.task(id)
        with _wrap_connection_errors():
            name, notify = self.store.redis.hmget(key, ["name", "notify"])
            if name is None:
                return None
            state = self.store.scripts["cancel"](
                keys=[key, self.keys.queue(text(name)), text(notify) or self.keys.done(id), self.keys.events(id)],
                args=[id, repr(time.time()), int(KEEP_S * 1000), "0" if running else "1"],
            )
        return text(state) or None

    def query(
        self,
        id: str,
        name: str,
        params: Any,
        timeout: float | None = None,
        policy: TaskExecutePolicy = TaskExecutePolicy.Auto,
        once: bool = False,
    ) -> Any:
        """Run a task according to ``policy`` and return its result.

        Args:
            id: Task id; reusing one replaces the old task.
            name: Queue name.
            params: Parameters handed to ``task_fn`` as ``task.params``.
            timeout: Deadline in seconds (default: the queue's ``timeout``).
            policy: Where to run it.
            once: Delete the task's data after reading its result.

        Raises:
            Exception: Whatever the task raised, as its own type; ``TaskTimeout`` on deadline.
        """
        task = self.build_task(id, name, params)
        if timeout is not None:
            task.expiry = time.time() + timeout
        if policy is TaskExecutePolicy.Auto:
            # Remote when a listener marks the queue: checked and queued in one round trip.
            if self.submit(task, timeout=timeout, if_listened=True) is not None:
                return self.wait(task, once=once)
            policy = TaskExecutePolicy.Local
        if policy is TaskExecutePolicy.Local:
            return self.execute_task_locally(task, timeout)
        if policy is TaskExecutePolicy.Remote:
            return self.execute_task_remotely(task, timeout, once)
        if policy is TaskExecutePolicy.LocalFirst:
            try:
                return self.execute_task_locally(task, timeout)
            except Exception as exc:
                logger.warning("task %s in %s failed locally (%r); running it remotely", id, name, exc)
                task.error = None
                return self.execute_task_remotely(task, timeout, once)
        if policy is TaskExecutePolicy.RemoteFirst:
            try:
                return self.execute_task_remotely(task, timeout, once)
            except Exception as exc:
                logger.warning("task %s in %s failed remotely (%r); running it locally", id, name, exc)
                return self.execute_task_locally(task, self.timeout if timeout is None else timeout)
        raise ValueError(f"unknown policy {policy!r}")


class _wrap_connection_errors:
    """Re-raise redis-py's connection failures as :class:`RtqConnectionError`."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, (redis_py.ConnectionError, redis_py.TimeoutError)):
            raise RtqConnectionError(f"Redis is unreachable: {exc}") from exc
