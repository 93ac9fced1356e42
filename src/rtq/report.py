"""Progress reporting from inside a task: ``rtq.tqdm``.

``rtq.tqdm`` is tqdm's own bar class (``tqdm.std.tqdm``: iterables, ``total=``, ``update()``,
``set_description()``, nesting, every option) with one addition. Inside a task
(:func:`rtq.current_task`), each time tqdm refreshes its display it also reports the bar to the
task (``task.update(n, total)``), which pushes it to the task's watchers. tqdm refreshes at most
every ``mininterval`` seconds and checks the clock only every ``miniters`` steps, so a loop pays
nothing per step beyond tqdm's own cost; closing the bar always writes its final state.

Inside a task the bar draws nothing on the worker (its watchers draw it), unless ``file=`` is
given. Outside a task it is a plain tqdm bar.

Nested bars report as one: the outermost open bar of the task sets the total, and each inner
bar adds its fraction of one outer step, so an epoch loop around a batch loop moves smoothly.
The description shown to watchers is the outermost non-empty one.
"""

from __future__ import annotations

from typing import Any

from tqdm.std import tqdm as _tqdm

from .task import RedisTask, current_task

__all__ = ["tqdm"]

_UNKNOWN = float("nan")  # the total of a bar without one; one object, so it compares as itself


class _Nowhere:
    """The file of a bar inside a task: its drawing would only clutter the task's stderr."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True  # so that tqdm(disable=None), "off when not a terminal", still reports

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class tqdm(_tqdm):  # type: ignore[type-arg]  # lowercase: the name users know
    """tqdm's bar (same arguments, iterables, ``update()``, ``set_description()``, nesting) that reports to the task.

    Inside a task (:func:`rtq.current_task`) each refresh of the bar — at most every
    ``mininterval`` seconds, so the loop pays nothing extra per step — becomes
    ``task.update(n, total)``, pushed to the task's watchers (``rtq.progress``, ``%%rtq``);
    closing the bar always writes its final state. Nested bars report as one value (the
    outermost bar's count plus the inner bars' fraction of a step), with the outermost
    non-empty description. It draws nothing on the worker unless ``file=`` is given.

    Outside a task it is a plain tqdm bar.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        task = current_task()
        self._rtq_task: RedisTask | None = task
        self._rtq_draw = True
        if task is None:
            super().__init__(*args, **kwargs)
            return
        if kwargs.get("file") is None and len(args) < 5:  # file is tqdm's 5th parameter
            kwargs["file"] = _Nowhere()
            self._rtq_draw = False
        bars = _bars(task)
        bars.append(self)  # before tqdm's first display, which already reports
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            _forget(bars, self)
            raise
        if self.disable:
            _forget(bars, self)
        elif not self._rtq_draw:
            # It draws nothing here, so it must not take a line: a library's own bar inside this
            # loop then draws on the task's current line (position 0), not on the one under it
            # with cursor moves, which its watchers would see as a new line at every redraw.
            with self._lock:
                self._instances.discard(self)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        task = self._rtq_task
        if task is not None and current_task() is task:  # never from tqdm's monitor thread
            _report(task)
        if task is None or self._rtq_draw:
            return super().display(msg, pos)  # type: ignore[no-any-return]
        return True

    def close(self) -> None:
        task = self._rtq_task
        was_open = not self.disable
        super().close()
        if task is None or not was_open:
            return
        bars = _bars(task)
        outermost = bool(bars) and bars[0] is self
        mine = current_task() is task  # not from a garbage collection after the task ended
        if outermost and mine:
            _report(task, force=True)  # the final state, even of a loop left early
        _forget(bars, self)
        if not outermost and bars and mine:
            _report(task)


def _bars(task: RedisTask) -> list[tqdm]:
    return task._reporter.bars


def _forget(bars: list[tqdm], bar: tqdm) -> None:
    """Take ``bar`` off ``bars`` by identity: tqdm bars compare equal by position, not by who they are."""
    bars[:] = [b for b in bars if b is not bar]


def _report(task: RedisTask, *, force: bool = False) -> None:
    """Report the task's open bars as one progress value, and a changed description."""
    bars = _bars(task)
    if not bars:
        return
    fraction = 0.0
    for inner in reversed(bars[1:]):
        fraction = min(1.0, (inner.n + fraction) / inner.total) if inner.total else 0.0
    outer = bars[0]
    total = float(outer.total) if outer.total else _UNKNOWN
    description = next((d for d in (_description(b) for b in bars) if d), "")
    reporter = task._reporter
    if description != reporter.description:
        if reporter.describe is not None:
            reporter.describe(description)
        reporter.description = description
    current = outer.n + fraction
    if (current, total) == reporter.sent:
        return  # e.g. closing a bar whose last refresh already wrote this final state
    task.current_progress, task.total_progress = current, total
    reported = reporter.reported_at
    task._push(force=force)
    if reporter.reported_at != reported:
        reporter.sent = (current, total)


def _description(bar: tqdm) -> str:
    desc = bar.desc or ""
    return desc[:-2] if desc.endswith(": ") else desc
