"""What a progress display draws: one :class:`Row` per bar on a :class:`Board`, and the :class:`View` that draws it.

:class:`rtq.display.Progress` keeps the board up to date from the tasks' events; a view — the
text one (:mod:`rtq.textview`), the widget one (:mod:`rtq.notebook.widgets`) or none
(:class:`NullView`) — renders it in its medium.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .task import TaskState

__all__ = ["ENDED", "Board", "NullView", "Row", "View"]

ENDED = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST, TaskState.INTERRUPTED)
"""How a row ends: the states of :data:`rtq.watch.FINAL_STATES`, and ``interrupted`` (the kernel's
interrupt stopped the watching, and with a ``%%rtq`` cell the cell)."""


@dataclass
class Row:
    """What one bar shows: a task, or all of them in aggregate mode.

    Attributes:
        label: The task's label (aggregate: what the tasks are).
        current: Progress so far (aggregate: tasks ended).
        total: What ``current`` counts up to; None when unknown.
        description: The task's own ``rtq.tqdm`` description, shown with its bar.
        state: How it ended (see :data:`ENDED`); None while it runs.
        error: A one-line summary of how it failed.
        started: When the bar started (Unix seconds).
        ended: When it ended; its times are frozen there.
        done: Aggregate: tasks done.
        failed: Aggregate: tasks that failed, were cancelled or were lost.
        line: The line the task is writing now (a library's tqdm redrawing it), for live views.
        unit: What ``current`` counts (``it``; aggregate: ``task``), for the rate.
    """

    label: str
    current: float = 0.0
    total: float | None = None
    description: str | None = None
    state: str | None = None
    error: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    done: int = 0
    failed: int = 0
    line: str = ""
    unit: str = "it"

    @property
    def elapsed(self) -> float:
        return max(0.0, (self.ended or time.time()) - self.started)

    def fraction(self) -> float:
        """How full the bar is, 0 to 1 (0 when the total is unknown)."""
        return min(1.0, self.current / self.total) if self.total else 0.0

    def counts(self) -> str:
        """``"3/10 [00:01<00:02, 2.50it/s]"`` as tqdm writes it; aggregate: done and failed apart."""
        from tqdm.std import tqdm

        n, total = _num(self.current), (_num(self.total) if self.total else None)
        ended_early = self.state is not None and self.state != TaskState.DONE  # no time left to estimate
        times = "[{elapsed}, {rate_fmt}]" if ended_early or total is None else "[{elapsed}<{remaining}, {rate_fmt}]"
        if total is None and not n:  # nothing counted: only how long it has run
            return tqdm.format_meter(0, None, self.elapsed, bar_format="[{elapsed}]")
        if total is None:
            counts = "{n_fmt}"
        elif self.failed:
            counts = "{n_fmt}/{total_fmt}: " + f"{self.done} done, {self.failed} failed"
        else:
            counts = "{n_fmt}/{total_fmt}"
        return tqdm.format_meter(n, total, self.elapsed, unit=self.unit, bar_format=f"{counts} {times}")

    def detail(self) -> str:
        """What else there is to say: how it ended when not done, else the task's description."""
        if self.done or self.failed:  # aggregate: its counts say how the tasks ended
            return ""
        if self.state is not None and self.state != TaskState.DONE:
            return f"{self.state}: {self.error}" if self.error else self.state
        return self.description or ""


@dataclass
class Board:
    """Everything a :class:`View` draws.

    Attributes:
        rows: The bars.
        aggregate: One bar for many tasks (then the failures are listed).
        failures: ``"<label>: <error>"`` for each task that did not end done.
        bars: Whether there are bars at all (a ``%%rtq`` cell with progress off shows only its
            output).
        visible: Whether the bars show yet (a ``%%rtq`` cell's appear once it ran a while).
    """

    rows: list[Row]
    aggregate: bool = False
    failures: list[str] = field(default_factory=list)
    bars: bool = True
    visible: bool = True


class View(Protocol):
    """One medium's rendering of a :class:`Progress`.

    ``start`` is called once, in the thread that made the view (a notebook places the bars in
    the cell running then); then ``update`` and ``output`` as things happen, from the thread
    that follows the tasks (maybe another); ``finish`` once, at the end.
    """

    def start(self, board: Board) -> None:
        """Take the bars' place: where the output of the calling code goes now (hidden while not ``board.visible``)."""

    def update(self, board: Board, indices: Iterable[int]) -> None:
        """Redraw these rows (and the failure list); show the bars once ``board.visible``."""

    def output(self, kind: str, text: str) -> None:
        """Show what the tasks wrote (``kind``: ``"stdout"`` or ``"stderr"``), as it is given."""

    def finish(self, board: Board) -> None:
        """Draw the final state; the bars stay, showing how the tasks ended."""


class NullView:
    """Shows nothing (``mode="off"``)."""

    def start(self, board: Board) -> None:
        pass

    def update(self, board: Board, indices: Iterable[int]) -> None:
        pass

    def output(self, kind: str, text: str) -> None:
        pass

    def finish(self, board: Board) -> None:
        pass


def _num(value: float) -> float | int:
    value = round(float(value), 2)
    return int(value) if value.is_integer() else value
