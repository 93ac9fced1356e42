"""The seed API: ``RedisTaskQueue``, ``RedisTask`` and ``TaskExecutePolicy``.

``query()`` runs a task here (with ``task_fn``) or on a listener somewhere else, chosen by a
:class:`TaskExecutePolicy`. A remote caller stores the task in one hash, pushes its id on the
queue's list, and then blocks on the task's *done list*, which the worker pushes to when the
task ends: the caller wakes the moment its task finishes, and ``interval`` only bounds how long
one blocking call lasts before the caller re-checks that the task still exists.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from threading import Event, Lock
from typing import TYPE_CHECKING, Any

from .backend.connections import CLIENT_TYPES, TRANSIENT, connection_error
from .backend.keys import Keys, check_name, hash_tagged
from .backend.store import TaskStore, text
from .backend.topology import is_cluster, where
from .collector import ERROR, Blocking, Collector
from .errors import TaskCancelled, TaskTimeout
from .serialization import DEFAULT_MAX_PAYLOAD, Serializer, env_secret
from .task import RedisTask, TaskExecutePolicy, TaskState, new_id, runner_stores_outcome, running
from .validate import check_callable, check_count, check_seconds, describe
from .worker.recovery import Reaper

if TYPE_CHECKING:
    import redis as redis_py

    from .worker.listener import Listener

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
        durable: Wait until a replica has acknowledged each submit and each outcome stored
            (``WAIT``), so a failover cannot lose them; costs a replication round trip each.

    On a Redis Cluster (``redis`` a ``redis.cluster.RedisCluster``) the prefix is written as a
    hash tag (``rtq`` becomes ``{rtq}``; a prefix holding a tag stays as it is), so every key of
    the queue lives in one slot; queues of different prefixes spread over the nodes.
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
        durable: bool = False,
    ) -> None:
        if not isinstance(redis, CLIENT_TYPES):  # never echo it: a URL may hold a password
            raise TypeError(
                f"redis must be a redis-py client such as redis.Redis.from_url(url), not {type(redis).__name__}; "
                "rtq.connect(url) makes a queue from a URL"
            )
        check_seconds("timeout", timeout)
        check_seconds("interval", interval)
        check_count("max_attempts", max_attempts)
        if task_fn is not None:
            check_callable("task_fn", task_fn)
        self.redis = redis
        self.prefix = prefix
        self.suffix = suffix
        self.timeout = timeout
        self.interval = interval
        self.task_fn = task_fn
        self.max_attempts = max_attempts
        self.durable = bool(durable)
        self.keys = Keys(hash_tagged(prefix) if is_cluster(redis) else prefix, suffix)
        if secret is None:
            secret = env_secret()
        self.serializer = Serializer(secret, max_payload=max_payload)
        self.store = TaskStore(redis, self.keys, self.serializer, max_attempts=max_attempts, durable=self.durable)
        self.reaper = Reaper(self.store, max_attempts)
        self._collector: Collector | None = None
        self._collector_lock = Lock()

    def __repr__(self) -> str:
        return f"<RedisTaskQueue {where(self.redis)} prefix={self.prefix!r} suffix={self.suffix!r}>"

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
        with _wrap_connection_errors(self.store.redis):
            self.store.write(task)
        return task.id

    def get_task(self, id: str, once: bool = False) -> RedisTask | None:
        """The stored task (with its progress, result or error), or None when there is none.

        Args:
            id: The task id.
            once: Delete the task's data after reading it.
        """
        with _wrap_connection_errors(self.store.redis):
            task = self.store.read(text(id), once=once)
        if task is not None:
            task._save = lambda: self.set_task(task)
        return task

    def has_task(self, id: str) -> bool:
        """Whether data for task ``id`` is stored."""
        with _wrap_connection_errors(self.store.redis):
            return self.store.exists(text(id))

    # -- listeners -------------------------------------------------------------------------
    def live_workers(self) -> list[dict[str, Any]]:
        """The heartbeat records of the workers whose lease holds (id, host, pid, queues, …)."""
        with _wrap_connection_errors(self.store.redis):
            return self.reaper.registry.live_records()

    def set_queue_listened(self, name: str) -> None:
        """Mark queue ``name`` as listened for the next ``timeout`` seconds."""
        check_name("queue name", name)
        with _wrap_connection_errors(self.store.redis):
            self.store.mark_listened(name, self.timeout)

    def is_listened(self, name: str) -> bool:
        """Whether a listener marked queue ``name`` within the last ``timeout`` seconds."""
        with _wrap_connection_errors(self.store.redis):
            return self.store.listened(name)

    def listen(self, names: Sequence[str], workers: int = 128, event: Event | None = None) -> None:
        """Serve the queues ``names`` (a list, or one name as a str) until ``event`` is set.

        Each task taken runs here through :meth:`execute_task_locally` (``task_fn`` unless a
        subclass overrides it); the listener stores its outcome. Up to ``workers`` tasks run at
        once in threads; a task id is claimed only when a slot is free, and it is moved
        atomically into this listener's in-progress list, so a crash never loses it. A queue
        entry that cannot be claimed (its data is gone, it expired, it already ran) is never
        dropped silently: it goes to the dead-letter list with the reason, and is logged once.
        Listener markers are set at once and kept fresh while every slot is busy.
        Returns within about ``interval`` seconds after ``event`` is set, once running tasks end.
        """
        if self.task_fn is None and type(self).execute_task_locally is RedisTaskQueue.execute_task_locally:
            raise ValueError("listen() needs a task_fn (or an execute_task_locally override) to run the tasks it takes")
        if isinstance(names, str):
            names = [names]  # one queue name, not the letters of one
        elif isinstance(names, (bytes, bytearray)) or not isinstance(names, Iterable):
            raise TypeError(f"names must be a list of queue names (or one name as a str), not {describe(names)}")
        check_count("workers", workers)
        self.listener(list(names), workers=workers, event=event).run()

    def listener(self, names: Sequence[str], **options: Any) -> Listener:
        """A worker for queues ``names`` of this namespace, not started yet (``rtq worker`` runs one).

        Each task it claims runs through :meth:`execute_task_locally`. ``options`` are the
        :class:`~rtq.worker.listener.Listener`'s (``workers``, ``event``, ``lease``, ``grace``,
        ``info``, ``worker_id``, ``heartbeat_process``, ``sessions``, ``session_idle``, ``cache_bytes``).
        """
        from .worker.listener import Listener

        return Listener(
            self.store,
            self.execute_task_locally,
            list(names),
            interval=self.interval,
            marker_ttl=self.timeout,
            max_attempts=self.max_attempts,
            **options,
        )

    # -- running ---------------------------------------------------------------------------
    def execute_task_locally(self, task: RedisTask, timeout: float | None = None) -> Any:
        """Run ``task`` here with ``task_fn`` and store its outcome; returns its result.

        This is the step every task run in this process goes through: ``query()``'s local runs
        and each task :meth:`listen` takes, so a subclass that overrides it (to log, time, or set
        up a GPU context) sees them all. A listener stores the outcome itself, fenced by its
        claim: for a task it runs, this method only runs it.
        """
        if self.task_fn is None:
            raise ValueError(f"cannot run task {task.id} locally: this queue has no task_fn")
        if timeout is not None:
            task.expiry = time.time() + check_seconds("timeout", timeout)
        try:
            with running(task):
                task.result = self.task_fn(task)
            return task.result
        except Exception as exc:
            task.error = exc
            raise
        finally:
            if not runner_stores_outcome(task):
                try:
                    self.store.write(task, state=TaskState.FAILED if task.error is not None else TaskState.DONE)
                except Exception:  # the local result matters more than its copy in Redis
                    logger.warning("could not store the outcome of local task %s", task.id, exc_info=True)

    def execute_task_remotely(self, task: RedisTask, timeout: float | None = None, once: bool = False) -> Any:
        """Queue ``task`` for a listener and wait until it ends; returns its result.

        ``query()`` sends its remote leg through here under every policy but Local, so a
        subclass that overrides it sees them all. Under ``Auto`` the queue is checked for a
        listener in the same atomic step that queues the task: when none marks it, nothing is
        queued and the call ends early (with an exception of rtq's own that ``query()``
        handles by running the task locally; an override should let it pass).

        Raises:
            rtq.errors.TaskTimeout: The deadline passed first (also a ``TimeoutError``).
            rtq.errors.TaskLost: The task's data vanished from Redis, or its queue entry did.
            Exception: Whatever the task raised, re-raised as its own type.
        """
        if timeout is not None:
            task.expiry = time.time() + check_seconds("timeout", timeout)
        if_listened = _auto.get() is task  # query()'s Auto: queue only where a listener is
        blocking = self._expect(task)
        try:
            queued = self.submit(task, notify=self.collector.inbox, if_listened=if_listened)
        except BaseException:
            self.collector.remove([task.id])
            raise
        if queued is None:
            self.collector.remove([task.id])
            raise _NotListened(task.name)
        blocking.wait.submitted = True
        return self._await(task, blocking, once=once)

    def submit(
        self, task: RedisTask, *, timeout: float | None = None, notify: str | None = None, if_listened: bool = False
    ) -> str | None:
        """Store and enqueue ``task`` without waiting; returns its submission token.

        With ``if_listened``, only when a listener marks the task's queue (checked in the same
        atomic step); returns None, storing nothing, when none does.
        """
        if timeout is not None:
            task.expiry = time.time() + check_seconds("timeout", timeout)
        token = new_id()
        with _wrap_connection_errors(self.store.redis):
            queued = self.store.submit([(task, token, notify)], listened=task.name if if_listened else None)
        return token if queued else None

    @property
    def collector(self) -> Collector:
        """The one blocking reader that wakes every waiter of this queue object (see :mod:`rtq.collector`)."""
        if self._collector is None:
            with self._collector_lock:
                if self._collector is None:
                    self._collector = Collector(self)
        return self._collector

    def _expect(self, task: RedisTask, *, done: str | None = None) -> Blocking:
        """Register a waiter for ``task``; a ``done`` list means it was submitted already."""
        timeout = self.timeout if task.expiry <= 0 else max(0.0, task.expiry - time.time())
        return self.collector.expect(task.id, task.name, task.expiry, _round(timeout), done=done, submitted=bool(done))

    def wait(self, task: RedisTask, *, once: bool = False) -> Any:
        """Block until ``task`` (already submitted) ends; returns its result or raises its error.

        The task is expected to announce its end on its done list (``submit``'s default); one
        announced elsewhere is still found, from its record, within a second.
        """
        return self._await(task, self._expect(task, done=self.keys.done(task.id)), once=once)

    def _await(self, task: RedisTask, blocking: Blocking, *, once: bool) -> Any:
        """Block on ``blocking`` (the collector settles it) and return or raise the outcome."""
        try:
            # The collector ends every wait at its deadline; the extra margin only guards
            # against a collector that cannot reach Redis to say so.
            while not self.collector.block(blocking, max(0.0, task.expiry - time.time()) + _MARGIN_S):
                if time.time() > task.expiry + _MARGIN_S:
                    self._cancel_quietly(task.id)
                    raise TaskTimeout(f"Task {task.id} in {task.name} ran past its deadline (Redis unreachable?)")
        finally:
            if blocking.ended is None:  # interrupted, or given up: stop waiting for it
                self.collector.remove([task.id])
        ended = blocking.ended
        assert ended is not None
        if once and ended.state != ERROR:
            with _wrap_connection_errors(self.store.redis):
                self.store.discard(task.id)
        if ended.state == TaskState.DONE:
            return ended.value
        if ended.state == TaskState.CANCELLED:
            raise TaskCancelled(f"Task {task.id} in {task.name} was cancelled")
        raise ended.value  # failed: the task's own exception; error: TaskTimeout, TaskLost, …

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
        with _wrap_connection_errors(self.store.redis):
            return self.store.cancel(id, running=running)

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
        if timeout is not None:
            check_seconds("timeout", timeout)
        if policy.__class__ is not TaskExecutePolicy:
            raise TypeError(
                f"policy must be a TaskExecutePolicy ({', '.join(TaskExecutePolicy.__members__)}), not "
                f"{describe(policy)}"
            )
        task = self.build_task(id, name, params)
        if timeout is not None:
            task.expiry = time.time() + timeout
        if policy is TaskExecutePolicy.Auto:
            # Remote when a listener marks the queue: execute_task_remotely checks and queues in
            # one atomic step, and hands back _NotListened (having queued nothing) when none does.
            intent = _auto.set(task)
            try:
                return self.execute_task_remotely(task, timeout, once)
            except _NotListened:
                policy = TaskExecutePolicy.Local
            finally:
                _auto.reset(intent)
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


_auto: contextvars.ContextVar[RedisTask | None] = contextvars.ContextVar("rtq_auto", default=None)
"""The task ``query()`` runs under ``Auto``: execute_task_remotely queues it only where a listener is."""


class _NotListened(BaseException):
    """Raised by ``execute_task_remotely`` under ``Auto`` when no listener marks the queue (nothing was queued).

    A ``BaseException``, so an override's ``except Exception`` (to log a remote failure) lets it
    through to ``query()``, which then runs the task locally.
    """


@contextmanager
def _wrap_connection_errors(client: redis_py.Redis) -> Iterator[None]:
    """Re-raise redis-py's connection failures as :class:`RtqConnectionError`."""
    try:
        yield
    except TRANSIENT as exc:
        raise connection_error(exc, client) from exc


def _round(seconds: float) -> float:
    """A timeout as a user would have written it (29.9996 -> 30) for messages."""
    return float(f"{seconds:.3g}")


_MARGIN_S = 5.0
"""Seconds past a deadline a caller waits for the collector to time its task out."""
