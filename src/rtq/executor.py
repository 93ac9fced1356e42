"""``rtq.Executor``: a ``concurrent.futures.Executor`` whose calls run on remote workers.

``submit(fn, *args, **kwargs)`` stores a :class:`~rtq.calls.Call` as a seed task and returns a
:class:`TaskFuture` at once. Every task of one executor announces its end by pushing its id on
the executor's *inbox* list, so one collector thread wakes for all of them (no polling), reads
the outcome and resolves the future. ``map`` submits in pipelined batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis as redis_py

from .calls import Call
from .closures import check_worker_versions, ship_local_modules
from .errors import TaskCancelled, TaskLost, TaskTimeout
from .fastpath import Channel
from .keys import check_name
from .store import OUTCOME_FIELDS, text
from .task import RedisTask

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["Executor", "TaskFuture"]

logger = logging.getLogger(__name__)

SUBMIT_BATCH = 500
"""Tasks stored per round trip by ``map``."""
COLLECT_BATCH = 1000
"""Most finished ids the collector takes from the inbox per round trip."""
EVENTS_KEEP_S = 60.0
"""Seconds a resolved task's events (progress, output) stay readable for late watchers."""


class TaskFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of one remote call: a real ``concurrent.futures.Future``.

    Works with ``concurrent.futures.wait``/``as_completed``, ``asyncio.wrap_future``, and can be
    awaited directly.

    Attributes:
        task_id: The id of the task in Redis.
        label: The submitted function's name (what ``rtq.progress`` shows), or None.
    """

    def __init__(self, executor: Executor, task: RedisTask) -> None:
        super().__init__()
        self.task_id = task.id
        self.name = task.name
        self.expiry = task.expiry
        self._executor = executor
        fn = getattr(task.params, "fn", None)
        self.label: str | None = getattr(fn, "__name__", None)  # what rtq.progress calls it
        self._last_progress: tuple[float, float] = (0.0, 100.0)

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} on {self.name!r} {self._state.lower()}>"

    @property
    def progress(self) -> tuple[float, float]:
        """``(current, total)`` as last reported by the task."""
        if not self.done():
            queue = self._executor.queue
            self._keep_progress(queue.store.redis.hget(queue.keys.task(self.task_id), "progress"))
        return self._last_progress

    def _keep_progress(self, raw: Any) -> None:
        if raw:
            current, total, _ = text(raw).split()
            self._last_progress = (float(current), float(total))

    def cancel(self) -> bool:
        """Cancel the call if it has not started; True only if it will not run."""
        if self.done():
            return self.cancelled()
        state = self._executor.queue.cancel(self.task_id, running=False)
        if state == "queued" or state == "cancelled":
            return self._mark_cancelled()
        return False

    def stop(self) -> bool:
        """Stop the call even if it is running (the task gets ``TaskCancelled``); True if it was live."""
        if self.done():
            return False
        state = self._executor.queue.cancel(self.task_id, running=True)
        if state == "queued":
            return self._mark_cancelled()
        return state == "running"

    def _mark_cancelled(self) -> bool:
        self._executor._forget(self.task_id)
        with self._condition:  # the collector may mark it at the same moment (it saw the cancel too)
            if self.cancelled():
                return True
            if not super().cancel():
                return False
            # What an executor does when it would have run a cancelled call: it moves the future to
            # CANCELLED_AND_NOTIFIED, which concurrent.futures.wait/as_completed count as done.
            self.set_running_or_notify_cancel()
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()


class Executor(concurrent.futures.Executor):
    """Runs calls on the workers listening on queue ``name``.

    Args:
        queue: The queue to submit to (e.g. from :func:`rtq.connect`).
        name: The queue name workers listen on (``rtq worker NAME``).
        timeout: Deadline of each call in seconds (default: the queue's ``timeout``).
        check_versions: Refuse to ship to workers with another Python or cloudpickle.
    """

    future_class: type[TaskFuture] = TaskFuture
    """The future ``submit`` returns; a subclass may return richer ones (``%%rtq``'s cell futures)."""

    def __init__(
        self, queue: RedisTaskQueue, name: str = "default", *, timeout: float | None = None, check_versions: bool = True
    ) -> None:
        check_name("queue name", name)
        self.queue = queue
        self.name = name
        self.timeout = queue.timeout if timeout is None else timeout
        self.check_versions = check_versions
        self.client_id = uuid.uuid4().hex
        self.inbox = queue.keys.inbox(self.client_id)
        self._pending: dict[str, TaskFuture] = {}
        self._lock = threading.Condition()
        self._shutdown = False
        self._collector: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<rtq.Executor {self.name!r} on {self.queue!r}, {len(self._pending)} pending>"

    # -- submitting ------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Ship ``fn(*args, **kwargs)`` to a worker; returns its future at once.

        Raises:
            rtq.errors.SerializationError: an argument cannot be shipped (nothing is stored).
            rtq.errors.VersionMismatch: the queue's workers run another Python/cloudpickle.
        """
        return self._submit_calls([Call(fn, args, kwargs)])[0]

    def _submit_calls(self, calls: list[Call]) -> list[TaskFuture]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
        if self.check_versions:
            check_worker_versions(self.queue, self.name)
        ship_local_modules()
        expiry = time.time() + self.timeout
        tasks = [RedisTask(id=uuid.uuid4().hex, name=self.name, params=call, expiry=expiry) for call in calls]
        futures = [self.future_class(self, t) for t in tasks]
        with self._lock:
            for fut in futures:
                self._pending[fut.task_id] = fut
            self._ensure_collector()
            self._lock.notify_all()
        try:
            self.queue.store.submit([(t, uuid.uuid4().hex, self.inbox) for t in tasks])
        except BaseException:
            with self._lock:
                for fut in futures:
                    self._pending.pop(fut.task_id, None)
            raise
        return futures

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order, submitted in bulk.

        ``chunksize`` > 1 runs that many calls per task, saving round trips on tiny calls.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        args = zip(*iterables)  # noqa: B905 - stops at the shortest, as Executor.map does
        if chunksize == 1:
            calls = [Call(fn, a) for a in args]
        else:
            calls = [Call(_run_chunk, (fn, chunk)) for chunk in _chunks(args, chunksize)]
        futures: list[TaskFuture] = []
        for i in range(0, len(calls), SUBMIT_BATCH):
            futures += self._submit_calls(calls[i : i + SUBMIT_BATCH])

        def results() -> Iterator[Any]:
            try:
                for fut in futures:
                    remaining = None if end is None else max(0.0, end - time.monotonic())
                    value = fut.result(remaining)
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; optionally cancel queued ones and wait for the rest."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
            self._lock.notify_all()
        if cancel_futures:
            for fut in pending:
                fut.cancel()
        if wait:
            concurrent.futures.wait(pending)
            if self._collector is not None:
                self._collector.join()

    # -- collecting ------------------------------------------------------------------------
    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._pending.pop(task_id, None)

    def _ensure_collector(self) -> None:
        if self._collector is None or not self._collector.is_alive():
            self._collector = threading.Thread(target=self._collect, name=f"rtq-collector-{self.name}", daemon=True)
            self._collector.start()

    def _collect(self) -> None:
        channel = Channel(self.queue.store.redis)  # the collector's own connection
        try:
            self._collect_on(channel)
        finally:
            channel.close()

    def _collect_on(self, channel: Channel) -> None:
        store = self.queue.store
        backoff = 0.0
        while True:
            with self._lock:
                while not self._pending and not self._shutdown:
                    self._lock.wait()
                if not self._pending and self._shutdown:
                    return
                nearest = min(f.expiry for f in self._pending.values())
                # One call awaited (``submit().result()``): its outcome rides along the wake-up.
                sole = next(iter(self._pending)) if len(self._pending) == 1 else None
            wait = max(0.01, min(self.queue.interval, store.cap, nearest - time.time() + 0.01))
            try:
                # One round trip wakes and drains: the LPOP runs right after the BLPOP returns.
                commands: list[tuple[Any, ...]] = [("BLPOP", self.inbox, wait), ("LPOP", self.inbox, COLLECT_BATCH)]
                if sole is not None:
                    commands.append(_read_outcome(self.queue.keys, sole))
                item, more, *ahead = channel.pipeline(commands)
                for reply in (item, more, *ahead):
                    if isinstance(reply, Exception):
                        raise reply
                if item is None and not more:
                    self._check_stragglers()
                    continue
                ids = [text(i) for i in ([item[1]] if item else []) + (more or [])]
                # Read after the pop, so final if the sole call is among those that ended.
                self._resolve_many(ids, channel, {sole: ahead[0]} if sole in ids else None)
                backoff = 0.0
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                backoff = min(max(backoff * 2, 0.1), 2.0)
                logger.warning("lost Redis while collecting results (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
            except Exception:  # a collector that dies would hang every future: log and go on
                logger.exception("error while collecting results")

    def _resolve(self, task_id: str) -> None:
        with self.queue.store.channels.channel() as channel:
            self._resolve_many([task_id], channel)

    def _resolve_many(self, task_ids: list[str], channel: Channel, read: dict[str, Any] | None = None) -> None:
        """Settle the futures of ended tasks: their outcomes are read in one round trip.

        The records are removed after the futures are settled, so a waiting caller is not held
        up by the clean-up.

        Args:
            task_ids: Tasks that ended.
            channel: The connection to read through.
            read: Outcomes already read (``_read_outcome``'s reply), by task id.
        """
        with self._lock:
            futures = [(i, self._pending.pop(i, None)) for i in task_ids]
        live = [(i, fut) for i, fut in futures if fut is not None and not fut.done()]
        if not live:
            return
        store, keys = self.queue.store, self.queue.keys
        read = read or {}
        unread = [_read_outcome(keys, i) for i, _ in live if i not in read]
        fetched = iter(channel.pipeline(unread) if unread else [])
        outcomes = [read[i] if i in read else next(fetched) for i, _ in live]
        settled = []
        n = len(OUTCOME_FIELDS)
        for (task_id, fut), values in zip(live, outcomes, strict=True):
            try:
                if isinstance(values, Exception):
                    raise values
                progress, attempts, params_list = values[n:]
                fut._keep_progress(progress)  # its final progress stays readable once the record is gone
                state, value = store.outcome(task_id, values[:n])
            except Exception as exc:
                _settle(fut, fut.set_exception, exc)
                continue
            if state == "cancelled" and _attempts(attempts) == 0:
                state = "cancelled while queued"  # no worker holds a claim on it: it never ran
            lists = [params_list, values[OUTCOME_FIELDS.index("result#")], values[OUTCOME_FIELDS.index("error#")]]
            settled.append((task_id, fut, state, value, store.frame_keys(keys.task(task_id), lists)))
        cleanup: list[tuple[Any, ...]] = []
        for task_id, _, state, _, frames in settled:
            if state in ("done", "failed", "cancelled", "cancelled while queued"):
                cleanup.append(("UNLINK", keys.task(task_id), *frames))
                # Watchers may still be reading the events.
                cleanup.append(("PEXPIRE", keys.events(task_id), int(EVENTS_KEEP_S * 1000)))
        for task_id, fut, state, value, _ in settled:
            if state == "done":
                _settle(fut, fut.set_result, value)
            elif state == "failed":
                _settle(fut, fut.set_exception, value)
            elif state == "cancelled while queued":
                fut._mark_cancelled()  # as Future.cancel() does, whichever thread gets here first
            elif state == "cancelled":
                _settle(fut, fut.set_exception, TaskCancelled(f"task {task_id} on {self.name!r} was cancelled"))
        if cleanup:
            channel.pipeline(cleanup)

    def _check_stragglers(self) -> None:
        """No push came: time out expired calls, fail vanished ones, reap lapsed workers."""
        now = time.time()
        with self._lock:
            futures = list(self._pending.values())
        expired = [f for f in futures if f.expiry <= now]
        for fut in expired:
            self.queue._cancel_quietly(fut.task_id)
            self._forget(fut.task_id)
            _settle(fut, fut.set_exception, TaskTimeout(f"task {fut.task_id} on {self.name!r} has expired"))
        live = [f for f in futures if f.expiry > now]
        if not live:
            return
        redis, keys = self.queue.store.redis, self.queue.keys
        pipe = redis.pipeline(transaction=False)
        for fut in live:
            pipe.hget(keys.task(fut.task_id), "state")
        states = pipe.execute()
        for fut, state in zip(live, states, strict=True):
            if state is None:
                self._forget(fut.task_id)
                lost = TaskLost(f"task {fut.task_id}'s data vanished from Redis (restart, eviction or flush)")
                _settle(fut, fut.set_exception, lost)
            elif text(state) not in ("queued", "running"):
                self._resolve(fut.task_id)  # ended, but its push was lost (e.g. Redis restarted)
        if any(text(s) == "running" for s in states if s is not None):
            self.queue.reaper.reap()


def _attempts(raw: Any) -> int:
    try:
        return int(text(raw) or 0)
    except ValueError:
        return 1


def _read_outcome(keys: Any, task_id: str) -> tuple[Any, ...]:
    """The command reading what settles a task's future: outcome, progress, attempts, params' frames."""
    return ("HMGET", keys.task(task_id), *OUTCOME_FIELDS, "progress", "attempt", "params#")


def _settle(fut: TaskFuture, setter: Callable[[Any], None], value: Any) -> None:
    """Resolve ``fut`` unless the user cancelled it meanwhile (a race no lock can close)."""
    try:
        setter(value)
    except concurrent.futures.InvalidStateError:
        pass


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]
