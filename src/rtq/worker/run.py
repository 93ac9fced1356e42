"""One attempt at one task in this worker: the claim that fences its writes, and its live parts.

A :class:`Run` is made when the listener claims a task and dropped when its outcome is stored.
It holds what only the worker needs — the attempt and submission token that fence every write
(progress, output, outcome), the list the caller is notified on, the :class:`Stopper` that can end
the task from outside, and the output sink while its output is captured — so the
:class:`~rtq.task.RedisTask` the task function receives stays the record the seed describes.
The watchdog reads runs (through :class:`~rtq.worker.state.WorkerState`) to stop unwanted ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..backend.claims import Held
from ..task import RedisTask
from .stopper import Stopper

if TYPE_CHECKING:
    from .sessions import Session

__all__ = ["OutputSink", "Run"]


class OutputSink(Protocol):
    """Where a run's captured output goes (:mod:`rtq.worker.capture`)."""

    @property
    def pending(self) -> bool: ...

    def flush(self) -> None: ...

    def describe(self, description: str) -> None: ...


@dataclass(eq=False)
class Run:
    """One claimed attempt at ``task``.

    Attributes:
        task: The task as its function sees it.
        attempt: The claim's attempt number (the record's ``attempt``).
        token: The submission's token ('' for a record written without one).
        notify: The list its caller is woken on when it ends.
        stopper: Ends the task from outside its thread (cancel, takeover, deadline).
        output: The sink of its captured output, while capture is on.
        slot: Whether it holds one of the worker's task slots (a call to a session does not:
            the session's own thread runs it).
        session: The session a call is aimed at (:func:`rtq.worker.sessions.current_session`
            while it runs), or None.
        ran: Called once it ran, before its outcome is stored (a session's record is updated
            before its caller wakes).
    """

    task: RedisTask
    attempt: int
    token: str = ""
    notify: str = ""
    stopper: Stopper = field(default_factory=Stopper)
    output: OutputSink | None = None
    slot: bool = True
    session: Session | None = None
    ran: Callable[[], object] | None = None

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def held(self) -> Held:
        """The claim, as the backend's fenced writes take it."""
        task = self.task
        return Held(task.id, task.name, self.attempt, self.token, self.notify, task.expiry)

    def flush_output(self) -> None:
        """Send pending output now (before a progress report, so watchers see them in order)."""
        output = self.output
        if output is not None and output.pending:
            output.flush()

    def describe(self, description: str) -> None:
        """Send an ``rtq.tqdm`` description to the task's watchers (dropped outside capture)."""
        output = self.output
        if output is not None:
            output.describe(description)
