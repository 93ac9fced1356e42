"""Follow remote tasks from the client: their progress, their output, their end.

Everything a task reports goes to its events stream (``<p>|<s>|task-events:<id>``, see
:mod:`rtq.backend.keys`), in the order it happened: progress from ``task.update()`` and ``rtq.tqdm``,
the text it writes to stdout and stderr (captured on the worker by :mod:`rtq.worker.capture`),
description changes, and last — written in the same atomic step that stores the outcome — one
``state`` entry. Watchers block on the stream (``XREAD BLOCK``, kept below the client's socket
timeout), so they wake when something happens; they never sleep between polls.

Two ways in:

* :func:`watch` follows **one** task in the calling thread and calls your functions; the
  building block for ``%%rtq`` and for custom displays.
* :class:`Follower` follows **many** tasks with one blocking read and returns :class:`Event`
  objects; :func:`rtq.progress` is built on it.

A finished task's events stay readable for a while (``rtq.collector.EVENTS_KEEP_S`` after an
``Executor`` resolves its future, else as long as the task's record), so watching a task that
already ended replays what it wrote and then returns its final state.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backend.events import Events
from .backend.store import text
from .errors import TaskCancelled
from .task import TaskState

if TYPE_CHECKING:
    from .executor import TaskFuture
    from .task_queue import RedisTaskQueue

__all__ = ["FINAL_STATES", "Event", "Follower", "watch"]

FINAL_STATES = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST)
"""How a followed task can end; ``lost``: its record vanished or expired before it ended."""
READ_COUNT = 1000
"""Most entries read from one task's stream per round trip."""
LONGEST_BLOCK = 1.0
"""Longest one blocking read waits (seconds) before checking stop requests and vanished tasks."""


@dataclass(frozen=True)
class Event:
    """One thing a followed task reported.

    Attributes:
        task_id: The task it comes from.
        kind: ``"progress"`` (also sent when only the description changed), ``"stdout"``,
            ``"stderr"``, or ``"state"`` (the last event of a task).
        text: For stdout/stderr the text exactly as written (a chunk: several lines, part of a
            line, ``\\r`` included); for state the final state (see :data:`FINAL_STATES`).
        current: Progress so far (progress events; the latest value on the others).
        total: What ``current`` counts up to; None when unknown.
        description: The task's ``rtq.tqdm`` description; None when it set none.
        time: When the worker wrote it (Unix seconds; progress events only).
    """

    task_id: str
    kind: str
    text: str = ""
    current: float = 0.0
    total: float | None = None
    description: str | None = None
    time: float | None = None


class _Followed:
    """What a :class:`Follower` knows about one task."""

    def __init__(self, task_id: str, future: concurrent.futures.Future[Any] | None) -> None:
        self.id = task_id
        self.future = future
        self.last = "0-0"
        self.state: str | None = None  # set once its state event was handed out
        self.ending: str | None = None  # known to have ended: read what is left, then end
        self.current = 0.0
        self.total: float | None = None
        self.description: str | None = None


class Follower:
    """Follows the events of several tasks with one blocking read per :meth:`poll`.

    Args:
        tasks: ``TaskFuture`` objects (from ``rtq.Executor``) and/or task ids.
        queue: The queue the tasks were submitted to; needed when every task is a bare id.

    Raises:
        ValueError: No tasks, or only ids and no ``queue``.
    """

    def __init__(self, tasks: Iterable[TaskFuture | str | bytes], *, queue: RedisTaskQueue | None = None) -> None:
        self.tasks: list[_Followed] = []
        for task in tasks:
            if isinstance(task, (str, bytes)):
                self.tasks.append(_Followed(text(task), None))
            elif isinstance(task, concurrent.futures.Future) and hasattr(task, "task_id"):
                self.tasks.append(_Followed(task.task_id, task))
                queue = queue or task._executor.queue  # type: ignore[attr-defined]
            else:
                raise TypeError(f"cannot follow {task!r}: pass rtq TaskFutures or task ids")
        if not self.tasks:
            raise ValueError("nothing to follow: pass at least one TaskFuture or task id")
        if queue is None:
            raise ValueError("following task ids needs the queue they were submitted to: pass queue=")
        self.store = queue.store
        self.keys = queue.keys
        self.events = Events(queue.store)  # the Redis half
        self._by_id = {t.id: t for t in self.tasks}
        self._block = min(self.store.cap, LONGEST_BLOCK)

    @property
    def done(self) -> bool:
        """True once every task's ``state`` event was returned by :meth:`poll`."""
        return all(t.state is not None for t in self.tasks)

    def states(self) -> dict[str, str | None]:
        """Each task's final state, None while it runs."""
        return {t.id: t.state for t in self.tasks}

    def poll(self, timeout: float | None = None) -> list[Event]:
        """Return the events that arrived, waiting for some up to ``timeout`` seconds.

        Waits at most ``LONGEST_BLOCK`` (and safely below the client's socket timeout) whatever
        ``timeout`` says, and not at all while a task is known to have ended; may return [].
        """
        live = [t for t in self.tasks if t.state is None]
        if not live:
            return []
        for t in live:
            if t.ending is None and t.future is not None and t.future.done():
                t.ending = _future_state(t.future)
        draining = any(t.ending for t in live)
        wait = self._block if timeout is None else max(0.0, min(timeout, self._block))
        block = None if draining or wait <= 0 else max(1, int(wait * 1000))
        reply = self.events.read({t.id: t.last for t in live}, READ_COUNT, block)
        events: list[Event] = []
        read: dict[str, int] = {}
        for task_id, entries in reply:
            t = self._by_id[task_id]
            read[t.id] = len(entries)
            for entry_id, fields in entries:
                t.last = text(entry_id)
                events.extend(self._parse(t, fields))
        if not reply and not draining and block is not None:
            self._check_quiet(live)
        for t in live:
            if t.state is None and t.ending is not None and read.get(t.id, 0) < READ_COUNT:
                events.append(self._end(t, t.ending))
        return events

    def _parse(self, t: _Followed, fields: dict[Any, Any]) -> list[Event]:
        events = []
        for raw_kind, raw_value in fields.items():
            kind, value = text(raw_kind), bytes(raw_value).decode("utf-8", "replace")
            if t.state is not None:
                break
            if kind in ("stdout", "stderr"):
                events.append(Event(t.id, kind, value, t.current, t.total, t.description))
            elif kind == "progress":
                try:
                    current, total, at = (float(v) for v in value.split())
                except ValueError:  # written by someone else than rtq: not worth a crash
                    continue
                t.current, t.total = current, (None if math.isnan(total) else total)
                events.append(Event(t.id, "progress", "", t.current, t.total, t.description, at))
            elif kind == "desc":
                t.description = value or None
                events.append(Event(t.id, "progress", "", t.current, t.total, t.description))
            elif kind == "state" and value in FINAL_STATES:
                events.append(self._end(t, value))
        return events

    def _end(self, t: _Followed, state: str) -> Event:
        t.state = state
        return Event(t.id, "state", state, t.current, t.total, t.description)

    def _check_quiet(self, live: list[_Followed]) -> None:
        """A quiet stream: find tasks that ended without a state event (expired, vanished)."""
        bare = [t for t in live if t.future is None and t.ending is None]
        if not bare:
            return
        for t, state in zip(bare, self.events.states([t.id for t in bare]), strict=True):
            if state is None:
                t.ending = TaskState.LOST
            elif state in FINAL_STATES:
                t.ending = state


def _future_state(future: concurrent.futures.Future[Any]) -> str:
    if future.cancelled():
        return TaskState.CANCELLED
    exc = future.exception()
    if exc is None:
        return TaskState.DONE
    return TaskState.CANCELLED if isinstance(exc, TaskCancelled) else TaskState.FAILED


def watch(
    task: TaskFuture | str,
    *,
    queue: RedisTaskQueue | None = None,
    on_output: Callable[[str, str], object] | None = None,
    on_progress: Callable[[float, float | None, str | None], object] | None = None,
    on_state: Callable[[str], object] | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> str | None:
    """Follow one task until it ends, calling back for everything it reports.

    Runs in the calling thread, blocking on Redis (pushed, no polling), and returns once the
    task ended and everything it reported before that was delivered, in order. Output written
    just before a failure is delivered before the end. Works for a task that already ended (it
    replays what is still stored) and for one still queued.

    Example (what a ``%%rtq`` cell does)::

        fut = executor.submit(fn)
        state = watch(fut, on_output=lambda stream, text: print(text, end="", file=sys.stderr
                      if stream == "stderr" else sys.stdout))
        value = fut.result()   # the outcome itself: raises the task's exception if it failed

    Args:
        task: A ``TaskFuture`` from ``rtq.Executor.submit`` / ``map``, or a task id.
        queue: The queue the task was submitted to; required for an id, taken from a future.
        on_output: ``on_output(stream, text)`` for each chunk the task wrote; ``stream`` is
            ``"stdout"`` or ``"stderr"``; ``text`` is exactly what was written, batched (about
            every 50 ms while the task writes): it may hold several lines, part of one, or
            ``\\r`` updates of a progress bar — write it as is, do not add newlines.
        on_progress: ``on_progress(current, total, description)`` at each progress report the
            worker sent (at most about 10 a second, the last one always) and each change of the
            task's ``rtq.tqdm`` description; ``total`` is None when unknown (a bar without a
            total), ``description`` None when the task set none.
        on_state: ``on_state(state)`` once, when the task ended (the return value).
        timeout: Stop following after this many seconds; the task itself goes on.
        stop: Stop following when this event is set (checked at least every second).

    Returns:
        The final state: ``"done"``, ``"failed"``, ``"cancelled"``, or ``"lost"`` (the task's
        record vanished or expired before it ended); None when ``timeout`` or ``stop`` ended
        the watch first. The result or exception is not returned: take it from the future
        (``fut.result()``, resolved right after the end) or ``queue.get_task(id)``.

    Raises:
        ValueError: ``task`` is an id and no ``queue`` was given.
        Exception: Whatever a callback raises ends the watch and propagates.
    """
    follower = Follower([task], queue=queue)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set():
            return None
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        for event in follower.poll(remaining):
            if event.kind == "progress":
                if on_progress is not None:
                    on_progress(event.current, event.total, event.description)
            elif event.kind == "state":
                if on_state is not None:
                    on_state(event.text)
                return event.text
            elif on_output is not None:
                on_output(event.kind, event.text)
