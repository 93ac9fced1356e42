"""Live bars for remote tasks: ``rtq.progress(*futures_or_ids)``.

How it looks depends on where it runs (or on ``mode=`` / ``RTQ_PROGRESS=widget|text|off``):

* **widget** — in a Jupyter kernel with ipywidgets: one bar per task (description, count,
  elapsed and remaining time; green when done, red when failed, grey when cancelled) and the
  tasks' output below, in the cell that called it. It returns at once: a background thread
  updates the widget models, so the notebook stays usable; ``.wait()`` blocks if wanted.
* **text** — elsewhere: tqdm bars on stderr that block until every task ended, the tasks' output
  printed above them. In a kernel without ipywidgets this is the fallback, announced by a
  one-line install hint; never an exception.
* **off** — shows nothing and returns at once.

More than ``many`` tasks (20) show as one aggregate bar plus the list of failures, not one bar
each. Everything comes from the tasks' events streams (:mod:`rtq.watch`): pushed, not polled.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .backend.store import text
from .watch import Event, Follower

if TYPE_CHECKING:
    from .executor import TaskFuture
    from .task_queue import RedisTaskQueue

__all__ = ["MANY", "Progress", "progress"]

logger = logging.getLogger(__name__)

MANY = 20
"""Above this many tasks, ``progress`` shows one aggregate bar instead of one bar per task."""
MODES = ("auto", "widget", "text", "off")
INSTALL_HINT = (
    "rtq.progress: ipywidgets is not installed, showing text bars; for live widget bars: pip install ipywidgets"
)
_hinted = False


@dataclass
class Row:
    """What one bar shows: a task, or all of them in aggregate mode."""

    label: str
    current: float = 0.0
    total: float | None = None
    description: str | None = None
    state: str | None = None  # the final state, once ended
    started: float = field(default_factory=time.time)
    ended: float | None = None

    @property
    def title(self) -> str:
        return self.description or self.label

    def counts(self) -> str:
        """``"3/10 [00:12<00:28]"``, or ``"3 [00:12]"`` without a total, plus the final state."""
        from tqdm.std import tqdm

        elapsed = max(0.0, (self.ended or time.time()) - self.started)
        n = _num(self.current)
        if self.total:
            rate = self.current / elapsed if elapsed and self.current else 0.0
            left = (self.total - self.current) / rate if rate else None
            remaining = "?" if left is None or self.state else tqdm.format_interval(max(0.0, left))
            out = f"{n}/{_num(self.total)} [{tqdm.format_interval(elapsed)}<{remaining}]"
        else:
            out = f"{n} [{tqdm.format_interval(elapsed)}]"
        return out if self.state in (None, "done") else f"{out} {self.state}"


class View(Protocol):
    """A way to show rows: text bars, widgets, or nothing."""

    raw_output: bool  # True: show output chunks as written; False: whole lines only

    def render(self, rows: list[Row], indices: Iterable[int]) -> None: ...
    def write(self, kind: str, text: str) -> None: ...
    def failures(self, lines: list[str]) -> None: ...
    def close(self) -> None: ...


class NullView:
    raw_output = True

    def render(self, rows: list[Row], indices: Iterable[int]) -> None:
        pass

    def write(self, kind: str, text: str) -> None:
        pass

    def failures(self, lines: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class TextView:
    """tqdm bars on stderr; task output printed above them, line by line."""

    raw_output = False
    COLOURS = {"done": "green", "failed": "red", "lost": "red", "cancelled": "#808080"}

    def __init__(self, rows: list[Row]) -> None:
        from tqdm.std import tqdm

        self._tqdm = tqdm
        self._failures: list[str] = []
        self.bars = [
            tqdm(total=row.total, desc=row.title, position=i, leave=True, file=sys.stderr, mininterval=0)
            for i, row in enumerate(rows)
        ]

    def render(self, rows: list[Row], indices: Iterable[int]) -> None:
        for i in indices:
            row, bar = rows[i], self.bars[i]
            bar.total = _num(row.total) if row.total else None
            bar.n = _num(row.current)
            bar.set_description_str(row.title, refresh=False)
            if row.state is not None:
                bar.colour = self.COLOURS.get(row.state)
                if row.state != "done":
                    bar.set_postfix_str(row.state, refresh=False)
            bar.refresh()

    def write(self, kind: str, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout if kind == "stdout" else sys.stderr, end="")

    def failures(self, lines: list[str]) -> None:
        self._failures = lines

    def close(self) -> None:
        for bar in reversed(self.bars):
            bar.close()
        for line in self._failures:
            print(line, file=sys.stderr)


class Progress:
    """The live view of some remote tasks, returned by :func:`progress`.

    Attributes:
        rows: What each bar shows (one per task, or one for all in aggregate mode).
        failures: ``"<label>: <error>"`` for each task that failed, was cancelled or was lost.
    """

    def __init__(
        self, follower: Follower, view: View, labels: list[str], *, aggregate: bool, show_output: bool, mode: str
    ) -> None:
        self.follower = follower
        self.view = view
        self.mode = mode
        self.labels = labels
        self.aggregate = aggregate
        self.show_output = show_output
        self.rows = [Row(f"{len(labels)} tasks", total=len(labels))] if aggregate else [Row(lb) for lb in labels]
        self.failures: list[str] = []
        self._index = {t.id: i for i, t in enumerate(follower.tasks)}
        self._partial: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_in: int | None = None  # the IPython execution that displayed it

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
        if ip is not None and self._created_in != ip.execution_count and hasattr(self.view, "box"):
            from IPython.display import display

            display(self.view.box)  # type: ignore[attr-defined]
        elif self.mode != "widget":
            print(repr(self))

    # -- following ----------------------------------------------------------------------------
    def _start(self, timeout: float | None) -> None:
        self._thread = threading.Thread(target=self._run, args=(timeout,), name="rtq-progress", daemon=True)
        self._thread.start()

    def _run(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ticked = time.monotonic()
            while not self._stop.is_set() and not self.follower.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                dirty = self._apply(self.follower.poll(remaining))
                if time.monotonic() - ticked >= 1.0:  # keep elapsed/remaining times moving
                    ticked = time.monotonic()
                    dirty |= {i for i, row in enumerate(self.rows) if row.state is None}
                if dirty:
                    self.view.render(self.rows, sorted(dirty))
        except Exception:
            if self._thread is None:
                raise
            logger.exception("rtq.progress stopped following")  # a background view must not kill the kernel
        finally:
            try:
                for key in list(self._partial):
                    self._flush_partial(*key)
                self.view.close()
            finally:
                self._finished.set()

    def _apply(self, events: list[Event]) -> set[int]:
        dirty: set[int] = set()
        for event in events:
            i = self._index[event.task_id]
            if event.kind == "progress":
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
                self._output(i, event.kind, event.text)
        return dirty

    def _ended(self, i: int, state: str) -> None:
        for kind in ("stdout", "stderr"):
            self._flush_partial(i, kind)
        row = self.rows[0] if self.aggregate else self.rows[i]
        now = time.time()
        if state != "done":
            self.failures.append(f"{self.labels[i]}: {self._error(i, state)}")
            self.view.failures(self.failures)
        if not self.aggregate:
            row.state, row.ended = state, now
            return
        row.current += 1
        if row.current >= len(self.labels):
            row.state, row.ended = ("done" if not self.failures else "failed"), now

    def _error(self, i: int, state: str) -> str:
        if state != "failed":
            return state
        task = self.follower.tasks[i]
        if task.future is not None:
            try:
                exc = task.future.exception(timeout=5)  # resolved right after the state event
            except (FutureTimeout, Exception):
                return state
            return _clip(f"{type(exc).__name__}: {exc}") if exc is not None else state
        info = self.follower.events.error_summary(task.id)
        if "type" not in info:
            return state
        return _clip(f"{info['type'].rsplit('.', 1)[-1]}: {info.get('message', '')}")

    def _output(self, i: int, kind: str, chunk: str) -> None:
        if self.view.raw_output and len(self.labels) == 1:
            self.view.write(kind, chunk)
            return
        buffered = self._partial.pop((i, kind), "") + chunk
        head, newline, tail = buffered.rpartition("\n")
        if tail:
            self._partial[(i, kind)] = tail
        if newline:
            self.view.write(kind, self._lines(i, head + "\n"))

    def _flush_partial(self, i: int, kind: str) -> None:
        rest = self._partial.pop((i, kind), "")
        if rest:
            self.view.write(kind, self._lines(i, rest + "\n"))

    def _lines(self, i: int, lines: str) -> str:
        # A task's own bar redraws a line with \r: show what a terminal would end up showing.
        out = []
        for line in lines.replace("\r\n", "\n").split("\n")[:-1]:
            shown = next((seg for seg in reversed(line.split("\r")) if seg), "")
            out.append(f"[{self.labels[i]}] {shown}" if len(self.labels) > 1 else shown)
        return "\n".join(out) + "\n"


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
        desc: Label of the bars (default: the submitted function's name, else the task id).
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
    labels = _unique([desc or _label(item) for item in items])
    aggregate = len(items) > many
    show_output = (not aggregate) if output is None else output
    bar = Progress(follower, NullView(), labels, aggregate=aggregate, show_output=show_output, mode=chosen)
    if chosen == "widget":
        try:
            from .notebook.widgets import WidgetView

            bar.view = WidgetView(bar.rows, aggregate=aggregate, output=show_output)  # displays it here
        except ImportError:
            _hint()
            chosen = bar.mode = "text"
        else:
            ip = _ipython()
            bar._created_in = ip.execution_count if ip is not None else None
    if chosen == "text":
        bar.view = TextView(bar.rows)
        bar._run(timeout)
        return bar
    bar._start(timeout)
    return bar


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
        ip = _ipython()
        chosen = "widget" if ip is not None and getattr(ip, "kernel", None) is not None else "text"
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


def _label(item: Any) -> str:
    if isinstance(item, Future):
        name = getattr(item, "label", None)
        return name or str(getattr(item, "task_id", "task"))[:8]
    return text(item)[:8]


def _unique(labels: list[str]) -> list[str]:
    """Number the labels that repeat (``job #1``, ``job #2``), so output and failures say which."""
    counts = {lb: labels.count(lb) for lb in labels}
    return [f"{lb} #{i + 1}" if counts[lb] > 1 else lb for i, lb in enumerate(labels)]


def _num(value: float) -> float | int:
    value = round(float(value), 2)
    return int(value) if value.is_integer() else value


def _clip(message: str, limit: int = 200) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
