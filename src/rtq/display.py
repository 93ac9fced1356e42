"""Live bars for remote tasks: ``rtq.progress(*futures_or_ids)``, and the bar of a ``%%rtq`` cell.

:class:`Progress` follows the tasks' events streams (:mod:`rtq.watch`: pushed, not polled) and
keeps what each bar shows — a :class:`Row` per task, or one for all of them in aggregate mode.
A :class:`View` shows it, one rendering per medium behind one small interface (``start``,
``update``, ``output``, ``finish``); how it looks depends on where it runs (or on ``mode=`` /
``RTQ_PROGRESS=widget|text|off``):

* **widget** — :class:`rtq.notebook.widgets.WidgetView`, in a Jupyter kernel with ipywidgets:
  one bar per task (label, count, elapsed and remaining time, rate; blue while it runs, green
  when done, red when it failed or was interrupted, grey when cancelled). ``rtq.progress``
  returns at once: a background thread moves the bars, so the notebook stays usable;
  ``.wait()`` blocks if wanted.
* **text** — :class:`rtq.textview.TextView`: the same rows as tqdm lines, redrawn in place on a terminal's
  stderr, or, in a kernel without widgets, one text display updated in place. It blocks until
  every task ended. In a kernel without ipywidgets this is the fallback, announced by a one-line
  install hint; never an exception.
* **off** — :class:`NullView`: shows nothing and returns at once.

What the tasks print is shown as a terminal shows it: a ``\\r`` rewrites the current line, so a
library's own tqdm bar inside a task ends up as one line. When several tasks print, each line
starts with its task's label — one label per task (by default the call, ``train(3)``: see
:func:`rtq.calls.call_label`), which its bar and the failure list use too. In a notebook that
text is ordinary output of the cell that called ``rtq.progress``, so it stays in the saved
notebook; the widget is the live view, and shows under its bar the line a task is still writing.

More than ``many`` tasks (20) show as one aggregate bar — done and failed apart — plus the list
of failures, not one bar each.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from .board import Board, NullView, Row, View
from .task import TaskState
from .textview import Screen, in_kernel
from .watch import Event, Follower

if TYPE_CHECKING:
    from .executor import TaskFuture
    from .task_queue import RedisTaskQueue

__all__ = ["MANY", "Board", "NullView", "Progress", "Row", "View", "follow_cell", "progress"]

logger = logging.getLogger(__name__)

MANY = 20
"""Above this many tasks, ``progress`` shows one aggregate bar instead of one bar per task."""
MODES = ("auto", "widget", "text", "off")
INSTALL_HINT = (
    "rtq.progress: ipywidgets is not installed, showing text bars; for live widget bars: pip install ipywidgets"
)
TICK = 1.0
"""Seconds between redraws of running bars when nothing happens (their elapsed time moves)."""
_hinted = False


class Progress:
    """The live view of some remote tasks, returned by :func:`progress`.

    Attributes:
        rows: What each bar shows (one per task, or one for all in aggregate mode).
        failures: ``"<label>: <error>"`` for each task that failed, was cancelled or was lost.
        labels: Each task's label, in the order given.
    """

    def __init__(
        self,
        follower: Follower,
        view: View,
        labels: list[str],
        *,
        aggregate: bool,
        show_output: bool,
        mode: str,
        title: str | None = None,
        raw_output: bool = False,
        bars: bool = True,
        show_after: float | None = None,
    ) -> None:
        self.follower = follower
        self.view = view
        self.mode = mode
        self.labels = labels
        self.aggregate = aggregate
        self.show_output = show_output
        self.raw_output = raw_output  # a %%rtq cell's own output: written as it came
        # None: the bars show at once (rtq.progress); else once progress came and the tasks ran
        # this many seconds (a %%rtq cell's); never without bars at all.
        self.show_after = show_after
        if aggregate:
            rows = [Row(title or f"{len(labels)} tasks", total=len(labels), unit="task")]
        else:
            rows = [Row(lb) for lb in labels]
        self.board = Board(rows, aggregate=aggregate, bars=bars, visible=bars and show_after is None)
        self._index = {t.id: i for i, t in enumerate(follower.tasks)}
        self._screens: dict[tuple[int, str], Screen] = {}  # what each task's stdout/stderr shows
        self._reported = False  # progress arrived (a %%rtq cell's bar shows only then)
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_in: int | None = None  # the IPython execution that displayed it
        self._started = time.monotonic()

    @property
    def rows(self) -> list[Row]:
        return self.board.rows

    @property
    def failures(self) -> list[str]:
        return self.board.failures

    def __repr__(self) -> str:
        states = [s for s in self.follower.states().values() if s]
        return f"<rtq.Progress of {len(self.labels)} task(s), {len(states)} ended, mode={self.mode}>"

    @property
    def done(self) -> bool:
        """True once the view stopped: every task ended, or it timed out or was stopped."""
        return self._finished.is_set()

    def states(self) -> dict[str, str | None]:
        """Each task's final state by id (None while it runs)."""
        return self.follower.states()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the view stopped (see :attr:`done`); returns :attr:`done`."""
        return self._finished.wait(timeout)

    def stop(self) -> None:
        """Stop following (the tasks go on); the bars keep their last state."""
        self._stop.set()

    def _ipython_display_(self) -> None:
        # The bars were displayed when created; show them again only when asked in a later cell.
        ip = _ipython()
        widget = getattr(self.view, "widget", None)
        if ip is not None and self._created_in != ip.execution_count and widget is not None:
            from IPython.display import display

            display(widget)
        elif self.mode != "widget":
            print(repr(self))

    # -- following ----------------------------------------------------------------------------
    def start(self) -> None:
        """Show the bars where output goes now (call it in the thread whose output that is)."""
        ip = _ipython()
        self._created_in = ip.execution_count if ip is not None else None
        self.view.start(self.board)

    def follow(self, timeout: float | None = None) -> None:
        """Follow in this thread until every task ended (or ``timeout``, or :meth:`stop`).

        Raises:
            KeyboardInterrupt: interrupted; the rows still running end as ``interrupted``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ticked = time.monotonic()
            while not self._stop.is_set() and not self.follower.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                dirty = self._apply(self.follower.poll(self._wait_for(remaining)))
                if time.monotonic() - ticked >= TICK:  # keep elapsed/remaining times moving
                    ticked = time.monotonic()
                    dirty |= {i for i, row in enumerate(self.rows) if row.state is None}
                if self._due():
                    self.board.visible = True
                    dirty |= set(range(len(self.rows)))
                if dirty:
                    self.view.update(self.board, sorted(dirty))
        except KeyboardInterrupt:
            self._end_running(TaskState.INTERRUPTED)
            raise
        except Exception:
            if threading.current_thread() is not self._thread:
                raise
            logger.exception("rtq.progress stopped following")  # a background view must not kill the kernel
        finally:
            try:
                for i, kind in list(self._screens):
                    self._flush(i, kind)
                self.view.finish(self.board)
            finally:
                self._finished.set()

    def _start_thread(self, timeout: float | None) -> None:
        # The thread runs in a copy of this context: what it prints (the tasks' output) goes to
        # the cell that called rtq.progress, even once another cell runs (ipykernel >= 7 keeps
        # each context's parent message).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self.follow, timeout), name="rtq-progress", daemon=True
        )
        self._thread.start()

    def _wait_for(self, remaining: float | None) -> float | None:
        """How long the next poll may block: up to the deadline, or until the bars are due."""
        if not self._pending():
            return remaining
        due = max(0.0, (self.show_after or 0.0) - (time.monotonic() - self._started))
        return due if remaining is None else min(due, remaining)

    def _due(self) -> bool:
        return self._pending() and time.monotonic() - self._started >= (self.show_after or 0.0)

    def _pending(self) -> bool:
        """Whether bars wait to show, and progress came (they show only then)."""
        return self.board.bars and not self.board.visible and self.show_after is not None and self._reported

    def _apply(self, events: list[Event]) -> set[int]:
        dirty: set[int] = set()
        for event in events:
            i = self._index[event.task_id]
            if event.kind == "progress":
                self._reported = True
                if not self.aggregate:
                    row = self.rows[i]
                    row.current, row.total, row.description = event.current, event.total, event.description
                    if event.time is not None and event.time < row.started:
                        row.started = event.time
                    dirty.add(i)
            elif event.kind == "state":
                self._ended(i, event.text)
                dirty.add(0 if self.aggregate else i)
            elif self.show_output:
                if self._output(i, event.kind, event.text) and not self.aggregate:
                    dirty.add(i)
        return dirty

    def _ended(self, i: int, state: str) -> None:
        for kind in ("stdout", "stderr"):
            self._flush(i, kind)
        now = time.time()
        error = self._error(i, state) if state != TaskState.DONE else ""
        if state != TaskState.DONE:
            self.board.failures.append(f"{self.labels[i]}: {error or state}")
        if not self.aggregate:
            row = self.rows[i]
            row.state, row.error, row.ended, row.line = state, error, now, ""
            return
        row = self.rows[0]
        row.current += 1
        if state == TaskState.DONE:
            row.done += 1
        else:
            row.failed += 1
        if row.current >= len(self.labels):
            row.state, row.ended = (TaskState.DONE if not row.failed else TaskState.FAILED), now

    def _end_running(self, state: str) -> None:
        now = time.time()
        for row in self.rows:
            if row.state is None:
                row.state, row.ended = state, now

    def _error(self, i: int, state: str) -> str:
        """The one-line summary of how task ``i`` failed ('' when there is nothing to add)."""
        if state != TaskState.FAILED:
            return ""
        task = self.follower.tasks[i]
        if task.future is not None:
            try:
                exc = task.future.exception(timeout=5)  # resolved right after the state event
            except (FutureTimeout, Exception):
                return ""
            return _clip(f"{type(exc).__name__}: {exc}") if exc is not None else ""
        info = self.follower.events.error_summary(task.id)
        if "type" not in info:
            return ""
        return _clip(f"{info['type'].rsplit('.', 1)[-1]}: {info.get('message', '')}")

    def _output(self, i: int, kind: str, chunk: str) -> bool:
        """Show what task ``i`` wrote; True when the line it is writing changed."""
        if self.raw_output:  # a %%rtq cell's own output: the notebook renders it as it renders a cell's
            self.view.output(kind, chunk)
            return False
        screen = self._screens.setdefault((i, kind), Screen())
        ended = screen.feed(chunk)
        if ended:
            self.view.output(kind, self._lines(i, ended))
        if self.aggregate:
            return False
        row = self.rows[i]
        line, row.line = row.line, screen.line
        return line != row.line

    def _flush(self, i: int, kind: str) -> None:
        screen = self._screens.pop((i, kind), None)
        rest = screen.flush() if screen is not None else []
        if rest:
            self.view.output(kind, self._lines(i, rest))
        if not self.aggregate:
            self.rows[i].line = ""

    def _lines(self, i: int, lines: list[str]) -> str:
        if len(self.labels) > 1:
            return "".join(f"[{self.labels[i]}] {line}\n" for line in lines)
        return "".join(line + "\n" for line in lines)


def progress(
    *tasks: TaskFuture | str | Iterable[TaskFuture | str],
    queue: RedisTaskQueue | None = None,
    mode: str | None = None,
    output: bool | None = None,
    many: int = MANY,
    desc: str | None = None,
    timeout: float | None = None,
) -> Progress:
    """Show live progress (and output) of remote tasks.

    Args:
        *tasks: ``TaskFuture`` objects from ``rtq.Executor``, task ids, or lists of them.
        queue: The queue of the tasks; needed when all are ids.
        mode: ``"widget"``, ``"text"``, ``"off"`` or ``"auto"`` (default: ``RTQ_PROGRESS``, else
            auto: widgets in a Jupyter kernel, text elsewhere).
        output: Also show what the tasks print (default: yes, unless in aggregate mode).
        many: Above this many tasks, show one aggregate bar and the list of failures.
        desc: Label of the bars (default: each task's own, the call it runs, ``train(3)``, as its
            future or its record names it; else the start of its id). In aggregate mode it
            titles the one bar, and the failures keep the tasks' own labels.
        timeout: Stop following after this many seconds (the tasks go on).

    Returns:
        A :class:`Progress`. In text mode it returns when every task ended (or ``timeout``);
        with widgets or ``off`` it returns at once and follows in a background thread.

    Raises:
        ValueError: No task given, ids without ``queue``, or an unknown mode.
    """
    items = _flatten(tasks)
    chosen = _mode(mode)
    follower = Follower(items, queue=queue)
    aggregate = len(items) > many
    own = _labels(items, follower)
    labels = _unique(own if aggregate or desc is None else [desc] * len(items))
    show_output = (not aggregate) if output is None else output
    view, chosen = _view(chosen, aggregate=aggregate, output=show_output)
    bar = Progress(
        follower,
        view,
        labels,
        aggregate=aggregate,
        show_output=show_output,
        mode=chosen,
        title=desc if aggregate else None,
    )
    bar.start()
    if chosen == "text":
        bar.follow(timeout)
    else:
        bar._start_thread(timeout)
    return bar


def follow_cell(fut: TaskFuture, *, show_after: float | None) -> Progress:
    """The bar and output of a ``%%rtq`` cell: started here, followed by :meth:`Progress.follow`.

    What the cell prints is written as it came, into the running cell (the notebook renders it
    as a cell's own output); the bar appears above it once the cell has run ``show_after``
    seconds and reported progress (None: never).
    """
    chosen = _mode(None)
    bars = show_after is not None and chosen != "off"  # off: no bar, and the cell's output still shows
    view, chosen = _view("text" if chosen == "off" else chosen, aggregate=False, output=True)
    label = getattr(fut, "label", None) or "%%rtq cell"
    bar = Progress(
        Follower([fut]),
        view,
        [label],
        aggregate=False,
        show_output=True,
        mode=chosen,
        raw_output=True,
        show_after=show_after or 0.0,
        bars=bars,
    )
    bar.start()
    return bar


def _view(mode: str, *, aggregate: bool, output: bool) -> tuple[View, str]:
    """The view for ``mode``, and the mode it ends up as (text, when widgets are missing)."""
    if mode == "off":
        return NullView(), mode
    if mode == "widget":
        try:
            from .notebook.widgets import WidgetView

            return WidgetView(aggregate=aggregate, output=output), mode
        except ImportError:
            _hint()
    from .textview import TextView

    return TextView(), "text"


def _flatten(tasks: tuple[Any, ...]) -> list[Any]:
    items: list[Any] = []
    for task in tasks:
        if isinstance(task, (list, tuple, set, frozenset)):
            items.extend(task)
        else:
            items.append(task)
    if not items:
        raise ValueError("progress() needs at least one TaskFuture or task id")
    return items


def _mode(mode: str | None) -> str:
    chosen = (mode or os.environ.get("RTQ_PROGRESS") or "auto").strip().lower()
    if chosen not in MODES:
        source = "mode" if mode else "RTQ_PROGRESS"
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, not {chosen!r}")
    if chosen == "auto":
        chosen = "widget" if in_kernel() else "text"
    return chosen


def _ipython() -> Any:
    """The running IPython shell, without importing IPython when nobody did."""
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None  # type: ignore[attr-defined]


def _hint() -> None:
    global _hinted
    if not _hinted:
        _hinted = True
        print(INSTALL_HINT, file=sys.stderr)


def _labels(items: list[Any], follower: Follower) -> list[str]:
    """Each task's own label: its future's, else the one its record holds, else its id's start."""
    labels: list[str | None] = [getattr(item, "label", None) if isinstance(item, Future) else None for item in items]
    bare = [i for i, lb in enumerate(labels) if lb is None and not isinstance(items[i], Future)]
    if bare:
        for i, stored in zip(bare, follower.events.labels([follower.tasks[i].id for i in bare]), strict=True):
            labels[i] = stored
    return [lb or follower.tasks[i].id[:8] for i, lb in enumerate(labels)]


def _unique(labels: list[str]) -> list[str]:
    """Number the labels that repeat (``job #1``, ``job #2``), so output and failures say which."""
    counts = {lb: labels.count(lb) for lb in labels}
    return [f"{lb} #{i + 1}" if counts[lb] > 1 else lb for i, lb in enumerate(labels)]


def _clip(message: str, limit: int = 200) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
