"""The task record (``RedisTask``), the execution policies, and the task running *here*.

A :class:`RedisTask` is what a task function receives: its id, queue name, parameters and
deadline, plus ``update()`` to report progress. ``current_task()`` returns it from anywhere in
the code the task runs (``rtq.tqdm`` uses that), without passing it around.
"""

from __future__ import annotations

import contextvars
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import TaskCancelled, TaskTimeout

__all__ = [
    "FINAL_STATES",
    "RedisTask",
    "Reporter",
    "TaskExecutePolicy",
    "TaskState",
    "current_task",
    "new_id",
    "outcome_stored_by_runner",
    "runner_stores_outcome",
]


def new_id() -> str:
    """A fresh task id or submission token: 32 random hex digits, like ``uuid.uuid4().hex``.

    From the ``random`` module's generator (seeded by the OS at start, and again in a forked
    child), not ``os.urandom``, whose system call costs tens of microseconds on some virtual
    machines, twice per submitted call. Ids and tokens name things uniquely; they are not
    secrets (payloads are guarded by signing, Redis by its own authentication).
    """
    return f"{random.getrandbits(128):032x}"


PROGRESS_INTERVAL = 0.1
"""Seconds between two progress writes of one task; updates in between are coalesced."""

_clock = time.time  # a module global: one lookup fewer on update()'s hot path


class TaskExecutePolicy(Enum):
    """Where :meth:`RedisTaskQueue.query` runs a task.

    Attributes:
        Local: Run it here with the queue's ``task_fn``.
        Remote: Push it to the queue for a listener.
        LocalFirst: Run it here; if that raises, push it to the queue.
        RemoteFirst: Push it to the queue; if that raises or times out, run it here.
        Auto: Remote when a listener marks the queue as listened, else Local.
    """

    Local = 0x00
    Remote = 0x01
    LocalFirst = 0x02
    RemoteFirst = 0x03
    Auto = 0x04


class TaskState(str, Enum):
    """Every state a task can be in: the ``state`` field of its record (and the Lua scripts' words).

    A ``str`` enum, so a state read from Redis compares equal to its member, and a member is
    written to Redis as its value.

    Attributes:
        QUEUED: Stored, and its id in its queue: no worker holds it.
        RUNNING: Claimed by a worker (its ``owner`` and ``attempt`` fence what it writes).
        DONE: Finished; the record holds its result.
        FAILED: It raised, could not be read, or was lost with its workers too often; the
            record holds the exception.
        CANCELLED: Its caller cancelled it; a queued task then never runs.
        LOST: Only as watchers and callers see it: its record vanished or expired, or its id
            is in no list, before it ended.
        INTERRUPTED: Only in progress displays: the kernel's interrupt stopped the watching (and,
            with a ``%%rtq`` cell, the cell) before the task ended.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    INTERRUPTED = "interrupted"

    __str__ = str.__str__  # "done", not "TaskState.DONE", in messages and f-strings

    @property
    def final(self) -> bool:
        """Whether the task has ended (its outcome is in its record, or it is gone)."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
"""The states a task's record ends in."""


@dataclass(eq=False)
class Reporter:
    """How a task's progress leaves it: the one hook a runner sets on a :class:`RedisTask`.

    A worker gives each task it runs a reporter whose ``send`` writes progress (fenced by its
    claim) and whose ``describe`` sends ``rtq.tqdm`` descriptions to watchers; a task run
    anywhere else keeps the default one, and ``update()`` then calls the task's ``save()``. It also
    keeps what ``update()`` and ``rtq.tqdm`` remember between two calls on the same task.

    Attributes:
        send: Writes the task's progress and returns its state in Redis (None: ``save()``).
        describe: Sends a bar's description to the task's watchers (None: dropped).
        reported_at: When progress was last written.
        quiet_until: Until when ``update()`` may return without a look at Redis or the deadline
            (its hot path).
        bars: The ``rtq.tqdm`` bars open in the task, outermost first.
        description: The description last sent.
        sent: The ``(current, total)`` last written by the bars.
    """

    send: Callable[[RedisTask], str | None] | None = None
    describe: Callable[[str], None] | None = None
    reported_at: float = 0.0
    quiet_until: float = 0.0
    bars: list[Any] = field(default_factory=list)
    description: str = ""
    sent: tuple[float, float] | None = None


@dataclass
class RedisTask:
    """One task: what to run, until when, and how far it got.

    Attributes:
        id: Unique id of the task (also its key in Redis).
        name: The queue it runs on.
        params: The task's parameters, as given to ``query``.
        expiry: Absolute Unix time after which the task is abandoned.
        result: The value the task returned, once done.
        error: The exception the task raised, once failed.
        update_progress_time: When progress was last reported.
        current_progress: Progress so far, in units of ``total_progress``.
        total_progress: What ``current_progress`` counts up to.
    """

    id: str
    name: str
    params: Any
    expiry: float
    result: Any = None
    error: Any = None
    update_progress_time: float = 0.0
    current_progress: float = 0.0
    total_progress: float = 100.0
    _save: Callable[[], object] | None = field(default=None, repr=False, compare=False)
    # Set by whoever runs the task (a worker): where its progress goes.
    _reporter: Reporter = field(default_factory=Reporter, init=False, repr=False, compare=False)

    def save(self) -> None:
        """Persist the task's state to Redis (a no-op for a task not tied to a queue)."""
        if self._save is not None:
            self._save()

    def update(self, current_progress: float, total_progress: float) -> None:
        """Report progress; cheap enough to call on every step of a loop.

        Writes reach Redis at most every ``PROGRESS_INTERVAL`` seconds, plus always the first
        and the final (``current >= total``) one, so watchers see the bar move and finish.
        Between two writes a call costs one clock read (see ``benchmarks/progress_overhead.py``).

        Raises:
            TimeoutError: The task's deadline has passed (an :class:`rtq.errors.TaskTimeout`).
            rtq.errors.TaskCancelled: Its caller cancelled it, or another worker took it over.
        """
        self.current_progress = current_progress
        self.total_progress = total_progress
        if current_progress < total_progress and _clock() < self._reporter.quiet_until:
            return
        self._push()

    def _push(self, *, force: bool = False) -> None:
        """Write the progress now if due (or ``force``); checks the deadline and the task's state."""
        now = _clock()
        self.update_progress_time = now
        if self.expiry < now:
            raise TaskTimeout(f"Task {self.id} in {self.name} has expired")
        final = self.current_progress >= self.total_progress
        reporter = self._reporter
        if not (final or force) and now - reporter.reported_at < PROGRESS_INTERVAL:
            reporter.quiet_until = min(reporter.reported_at + PROGRESS_INTERVAL, self.expiry)
            return
        reporter.reported_at = now
        reporter.quiet_until = min(now + PROGRESS_INTERVAL, self.expiry)
        if reporter.send is not None:
            state = reporter.send(self)
            if state in (TaskState.CANCELLED, TaskState.LOST):
                reason = "was cancelled" if state == TaskState.CANCELLED else "was taken over by another worker"
                raise TaskCancelled(f"Task {self.id} in {self.name} {reason}")
        else:
            self.save()


_current: contextvars.ContextVar[RedisTask | None] = contextvars.ContextVar("rtq_task", default=None)


def current_task() -> RedisTask | None:
    """The task running in this thread, or None outside a task."""
    return _current.get()


@contextmanager
def running(task: RedisTask) -> Iterator[RedisTask]:
    """Make ``task`` the :func:`current_task` while the block runs."""
    token = _current.set(task)
    try:
        yield task
    finally:
        _current.reset(token)


_runner_stores: contextvars.ContextVar[RedisTask | None] = contextvars.ContextVar("rtq_runner_stores", default=None)


@contextmanager
def outcome_stored_by_runner(task: RedisTask) -> Iterator[None]:
    """While the block runs, whoever runs ``task`` (a worker) stores its outcome, not the code it calls.

    A listener runs each task through :meth:`RedisTaskQueue.execute_task_locally` (the seed's
    override point) and stores the outcome itself, fenced by its claim; this tells that method
    not to write it a second time, unfenced.
    """
    token = _runner_stores.set(task)
    try:
        yield
    finally:
        _runner_stores.reset(token)


def runner_stores_outcome(task: RedisTask) -> bool:
    """Whether ``task`` runs inside :func:`outcome_stored_by_runner` (its outcome is stored for it)."""
    return _runner_stores.get() is task
