"""``rtq.Executor``: a ``concurrent.futures.Executor`` whose calls run on remote workers.

``submit(fn, *args, **kwargs)`` stores a :class:`~rtq.calls.Call` as a seed task and returns a
:class:`TaskFuture` at once. Every task announces its end on its queue object's inbox, where
the queue's one collector (:mod:`rtq.collector`, shared with ``query()``) wakes for all of them
(no polling), reads the outcome and resolves the future. ``map`` submits in pipelined batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from .backend.connections import TRANSIENT, connection_error
from .backend.events import Events
from .backend.keys import check_name
from .backend.store import text
from .calls import Call
from .closures import check_worker_versions, ship_local_modules
from .collector import ERROR, Ended, Pin, Wait
from .errors import RtqError, TaskCancelled
from .task import RedisTask, TaskState, new_id
from .validate import check_callable, check_count, check_seconds, check_wait, describe
from .worker.held import HeldResult

if TYPE_CHECKING:
    from .sessions import Actor, SessionHandle
    from .task_queue import RedisTaskQueue

__all__ = ["Executor", "TaskFuture"]

logger = logging.getLogger(__name__)

SUBMIT_BATCH = 500
"""Tasks stored per round trip by ``map``."""
SENT_WAIT_S = 30.0
"""Longest a future's ``cancel()``/``stop()`` waits for Redis's answer to its submission."""


class TaskFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of one remote call: a real ``concurrent.futures.Future``.

    Works with ``concurrent.futures.wait``/``as_completed``, ``asyncio.wrap_future``, and can be
    awaited directly.

    The future of an actor call whose value is large is done when the call ends, while the value
    stays on the worker (:mod:`rtq.worker.held`): the first ``result()`` fetches it (so an
    ``asyncio`` wait on it blocks its loop for the transfer), and dropping the future frees it.

    Attributes:
        task_id: The id of the task in Redis.
        label: The submitted call's label, e.g. ``train(3)`` (what ``rtq.progress`` and
            ``rtq status`` show), or None.
    """

    def __init__(self, executor: Executor, task: RedisTask) -> None:
        super().__init__()
        self.task_id = task.id
        self.name = task.name
        self.expiry = task.expiry
        self._executor = executor
        self.label: str | None = getattr(task.params, "label", None) or None  # what rtq.progress calls it
        self._last_progress: tuple[float, float] = (0.0, 100.0)
        # Redis answered its submission (stored it, or refused). Its own Event: notifying the
        # future's condition would end a result() wait early, which takes any wake-up for the end.
        self._sent = threading.Event()
        self._session: SessionHandle | None = None  # the session a call was aimed at (holds large results)
        self._fetch: TaskFuture | None = None  # the call fetching a held result home
        self._fetch_lock = threading.Lock()
        self._held_finalizer: weakref.finalize | None = None  # frees a held result nobody asked for

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} on {self.name!r} {self._state.lower()}>"

    def result(self, timeout: float | None = None) -> Any:
        """The call's return value, waiting up to ``timeout`` seconds (None: until it ends).

        A large value an actor held on its worker is fetched now, within the same ``timeout``.

        Raises:
            TimeoutError: It did not end within ``timeout`` (the call goes on).
            rtq.errors.TaskTimeout: The call ran past its own deadline (the Executor's ``timeout``).
            rtq.errors.SessionLost: The actor holding its large value is gone, and the value with it.
            Exception: Whatever the call raised, as its own type.
        """
        timeout = check_wait("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        self._collect(end)
        value = super().result(None if end is None else max(0.0, end - time.monotonic()))
        if isinstance(value, HeldResult) and self._session is not None:
            return self._fetched(value, None if end is None else max(0.0, end - time.monotonic()))
        return value

    def _fetched(self, held: HeldResult, timeout: float | None) -> Any:
        """The value ``held`` names, fetched once from the worker (later calls wait on that fetch)."""
        session = self._session
        assert session is not None
        if self._executor.queue.collector.settling():
            raise RtqError(
                f"result() of call {self.task_id} must fetch its large value from the worker, which cannot "
                "happen inside a done-callback: call result() from another thread"
            )
        with self._fetch_lock:
            if self._fetch is None:
                self._fetch = session.fetch(held)
                if self._held_finalizer is not None:
                    self._held_finalizer.detach()  # fetching frees it on the worker
            fetch = self._fetch
        return fetch.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the call raised (None if it returned), waiting as :meth:`result` does."""
        timeout = check_wait("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        self._collect(end)
        return super().exception(None if end is None else max(0.0, end - time.monotonic()))

    def _collect(self, end: float | None) -> None:
        """Before blocking: collect outcomes in this thread while nobody else does (see :meth:`Collector.lead`).

        The call's end then wakes this very thread, not the collector thread that would hand
        it over. A future settled elsewhere (or whose wait ran out) returns at once.
        """
        if not self.done() and (end is None or time.monotonic() < end):
            self._executor.queue.collector.lead(self.task_id, self.done, end)

    @property
    def progress(self) -> tuple[float, float]:
        """``(current, total)`` as last reported by the task."""
        if not self.done() and self._stored():
            self._keep_progress(self._executor.events.progress(self.task_id))
        return self._last_progress

    def _stored(self) -> bool:
        """Wait for Redis's answer to the submission (a call sent ahead); False if none came.

        What reads or changes the task in Redis waits for it, or could run before the task is there.
        """
        return self._sent.wait(SENT_WAIT_S)

    def _mark_sent(self) -> None:
        self._sent.set()

    def _keep_progress(self, raw: Any) -> None:
        if raw:
            current, total, _ = text(raw).split()
            self._last_progress = (float(current), float(total))

    def cancel(self) -> bool:
        """Cancel the call if it has not started; True only if it will not run."""
        if not self._stored() or self.done():
            return self.cancelled()
        state = self._executor.queue.cancel(self.task_id, running=False)
        if state in (TaskState.QUEUED, TaskState.CANCELLED):
            return self._mark_cancelled()
        return False

    def stop(self) -> bool:
        """Stop the call even if it is running (the task gets ``TaskCancelled``); True if it was live."""
        if not self._stored() or self.done():
            return False
        state = self._executor.queue.cancel(self.task_id, running=True)
        if state == TaskState.QUEUED:
            return self._mark_cancelled()
        return state == TaskState.RUNNING

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
        self.timeout = queue.timeout if timeout is None else check_seconds("timeout", timeout)
        self.check_versions = check_versions
        self._pending: dict[str, TaskFuture] = {}
        self.events = Events(queue.store)  # what a future's progress reads
        self._lock = threading.Condition()
        self._shutdown = False

    @property
    def inbox(self) -> str:
        """The list this executor's tasks announce their end on (its queue's collector inbox)."""
        return self.queue.collector.inbox

    def __repr__(self) -> str:
        return f"<rtq.Executor {self.name!r} on {self.queue!r}, {len(self._pending)} pending>"

    # -- submitting ------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Ship ``fn(*args, **kwargs)`` to a worker; returns its future at once.

        Raises:
            TypeError: ``fn`` is not callable (nothing is stored).
            rtq.errors.SerializationError: an argument cannot be shipped (nothing is stored).
            rtq.errors.VersionMismatch: the queue's workers run another Python/cloudpickle.
        """
        check_callable("submit()'s fn", fn)
        return self._submit_calls([Call(fn, args, kwargs)], soon=True)[0]

    def actor(self, cls: type, /, *args: Any, **kwargs: Any) -> Actor:
        """Build ``cls(*args, **kwargs)`` in one worker process serving this queue; returns its :class:`Actor`.

        The instance stays there: ``actor.method(...)`` runs the method on it and returns a
        :class:`TaskFuture`; calls run one at a time, in the order they were made. ``cls`` may be
        defined in a notebook (it is shipped by value). Waits until the instance is built.

        Raises:
            TypeError: ``cls`` is not a class.
            rtq.errors.SessionRefused: The worker holds its ``--sessions`` limit of sessions.
            Exception: Whatever ``cls(*args, **kwargs)`` raised, as its own type.
        """
        from .sessions import Actor, SessionHandle

        if not isinstance(cls, type):
            raise TypeError(f"actor() needs a class, not {describe(cls)}")
        return Actor(SessionHandle.open(self, "actor", cls.__qualname__, cls, args, kwargs), cls)

    def _submit_calls(
        self,
        calls: list[Call],
        *,
        soon: bool = False,
        pin: Pin | None = None,
        extra: dict[str, str] | None = None,
    ) -> list[TaskFuture]:
        """Store calls and register their futures.

        A call sent ahead (``soon``: one call of ``submit``) does not wait for Redis's answer, so
        a loop of submits leaves in pipelined batches of its own making; a refusal Redis sends
        back afterwards (``RedisFull``, a lost connection) fails its future instead of raising here.

        Args:
            calls: What to run.
            soon: Send the one call ahead (see above).
            pin: Queue them to that one worker process (a session's calls, or its opening).
            extra: More fields for their records (``session``).
        """
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
        if self.check_versions:
            check_worker_versions(self.queue, self.name)
        ship_local_modules()
        expiry = time.time() + self.timeout
        tasks = [RedisTask(id=new_id(), name=self.name, params=call, expiry=expiry) for call in calls]
        futures = [self.future_class(self, t) for t in tasks]
        with self._lock:
            for fut in futures:
                self._pending[fut.task_id] = fut
        collector = self.queue.collector
        waits = [
            Wait(f.task_id, self.name, expiry, self.timeout, partial(self._ended, f), consume=True, pin=pin)
            for f in futures
        ]
        ahead = soon and pin is None and extra is None
        inbox = collector.add(waits, summon=not ahead)  # a call sent ahead summons it once Redis answers
        try:
            if ahead:
                (task,), (fut,), (wait,) = tasks, futures, waits
                self.queue.store.submit_soon(task, new_id(), inbox, partial(self._stored, fut, wait))
            else:
                into = pin.listed_in if pin is not None else None
                self.queue.store.submit([(t, new_id(), inbox) for t in tasks], into=into, extra=extra)
                for wait, fut in zip(waits, futures, strict=True):
                    wait.submitted = True
                    fut._mark_sent()
        except BaseException as exc:
            self._unsubmitted(futures)
            if isinstance(exc, TRANSIENT):
                raise connection_error(exc, self.queue.store.redis) from exc
            raise
        return futures

    def _stored(self, fut: TaskFuture, wait: Wait, error: BaseException | None) -> None:
        """Redis's answer to a call sent ahead: the collector may now look for its record, or it failed."""
        if error is None:
            wait.submitted = True
            fut._mark_sent()
            # Only now: a result() called right after submit() collects in its own thread meanwhile.
            self.queue.collector.summon()
            return
        self._unsubmitted([fut])
        if isinstance(error, TRANSIENT):
            error = connection_error(error, self.queue.store.redis)
        _settle(fut, fut.set_exception, error)
        fut._mark_sent()

    def _unsubmitted(self, futures: list[TaskFuture]) -> None:
        """Stop waiting for calls that were not stored."""
        self.queue.collector.remove([f.task_id for f in futures])
        with self._lock:
            for fut in futures:
                self._pending.pop(fut.task_id, None)
            self._lock.notify_all()

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order, submitted in bulk.

        ``chunksize`` > 1 runs that many calls per task, saving round trips on tiny calls.
        """
        check_callable("map()'s fn", fn)
        check_count("chunksize", chunksize)
        timeout = check_wait("timeout", timeout)
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
            self.queue.collector.clean_up()  # what the last results left, now rather than at the next wake-up

    # -- collecting ------------------------------------------------------------------------
    def _forget(self, task_id: str) -> None:
        self.queue.collector.remove([task_id])
        with self._lock:
            self._pending.pop(task_id, None)
            self._lock.notify_all()

    def _ended(self, fut: TaskFuture, how: Ended) -> None:
        """Settle ``fut`` with how its task ended (called by the queue's collector)."""
        with self._lock:
            self._pending.pop(fut.task_id, None)
            self._lock.notify_all()
        if how.progress:
            fut._keep_progress(how.progress)  # its final progress stays readable once the record is gone
        if how.state == TaskState.DONE:
            if isinstance(how.value, HeldResult) and fut._session is not None:
                # Its value stays on the worker until asked for; a future nobody holds frees it.
                fut._held_finalizer = weakref.finalize(fut, fut._session.forget, how.value.task_id)
            _settle(fut, fut.set_result, how.value)
        elif how.state in (TaskState.FAILED, ERROR):
            _settle(fut, fut.set_exception, how.value)
        elif how.attempts == 0:  # cancelled while queued: no worker holds a claim on it, it never ran
            fut._mark_cancelled()  # as Future.cancel() does, whichever thread gets here first
        else:
            _settle(fut, fut.set_exception, TaskCancelled(f"task {fut.task_id} on {self.name!r} was cancelled"))


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
