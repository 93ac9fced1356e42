"""Widget bars for :func:`rtq.progress` and ``%%rtq`` in Jupyter (ipywidgets, imported only here).

The widgets are created and displayed in the thread that started the view, so they land in that
cell (a ``%%rtq`` cell's bar first as an empty placeholder, filled in when the bar is due, so it
sits above the cell's output); afterwards only their models' traits change (ipywidgets 8 sends
those updates from any thread).

The widgets are the live view only: a notebook saved without its widget state (JupyterLab's
default) shows "Error displaying widget: model not found" in their place. So what the tasks print
is written to the cell's own ``sys.stdout`` / ``sys.stderr`` (captured when the view started), as
ordinary text output of that cell; and once the view finished, its display is replaced by a
still picture of the final bars (HTML, and text for other readers), which the saved notebook
keeps. ``rtq.progress`` writes from a thread running in the context of the cell that called it,
which is where ipykernel (7 and later) sends that thread's output and display updates.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..task import TaskState

if TYPE_CHECKING:
    from ..board import Board, Row

__all__ = ["WidgetView"]

STYLES: dict[str, str] = {
    TaskState.DONE: "success",
    TaskState.FAILED: "danger",
    TaskState.LOST: "danger",
    TaskState.INTERRUPTED: "danger",
}
GREY = "#9e9e9e"
COLOURS: dict[str, str] = {  # of a still bar, as ipywidgets colours a FloatProgress of that bar_style
    TaskState.RUNNING: "var(--jp-brand-color1, #2196f3)",
    TaskState.DONE: "var(--jp-success-color1, #4caf50)",
    TaskState.FAILED: "var(--jp-error-color1, #f44336)",
    TaskState.LOST: "var(--jp-error-color1, #f44336)",
    TaskState.INTERRUPTED: "var(--jp-error-color1, #f44336)",
}
TRACK = "var(--jp-layout-color3, #e0e0e0)"
LABEL_WIDTH = 32
"""Widest label column (characters); longer labels are cut with an ellipsis (whole on hover)."""
MONO = "font-family: var(--jp-code-font-family, monospace); white-space: pre"
DIM = "color: var(--jp-ui-font-color2, #616161)"
RED = "color: var(--jp-error-color1, #d32f2f)"


class WidgetView:
    """One line per :class:`~rtq.board.Row` — label, bar, counts — with a detail line under it.

    The columns have fixed widths, so a bar does not shift as its counts grow. The detail line
    shows the task's own ``rtq.tqdm`` description, the line it is writing now (a library's tqdm
    redrawing it), or how it failed. An aggregate row's bar shows the failed tasks apart, in
    red, and the failures are listed under it.

    Raises:
        ImportError: ipywidgets (or IPython) is not installed.
    """

    def __init__(self, *, aggregate: bool = False, output: bool = True) -> None:
        import ipywidgets

        self._w = ipywidgets
        self.aggregate = aggregate
        self.output_shown = output
        self.widget: Any = None  # the whole view, once shown
        self._rows: list[dict[str, Any]] = []
        self._failures: Any = None
        self._streams: dict[str, Any] = {}
        self._handle: Any = None  # the view's display: the bars, or their placeholder until shown
        self._shown = False

    # -- View ---------------------------------------------------------------------------------
    def start(self, board: Board) -> None:
        from IPython.display import display

        self._streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        if board.visible:
            self._build(board)
            self._handle = display(self.widget, display_id=True)
            self._shown = True
        elif board.bars:
            # Placed now, before the output: the bar appears above it when it is due.
            self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.update(board, range(len(board.rows)))

    def update(self, board: Board, indices: Iterable[int]) -> None:
        if not board.visible:
            return
        if not self._shown:  # due now: built here (a bar never shown makes no widgets)
            self._build(board)
            self._handle.update(self.widget)
            self._shown = True
            indices = range(len(board.rows))
        for i in indices:
            self._render(board.rows[i], self._rows[i])
        if self._failures is not None and board.failures:
            self._failures.value = _failure_list(board.failures)
            self._failures.layout.display = None

    def output(self, kind: str, text: str) -> None:
        stream = self._streams.get(kind) or sys.stdout
        stream.write(text)
        stream.flush()

    def finish(self, board: Board) -> None:
        self.update(board, range(len(board.rows)))
        if self._shown:
            self._handle.update(snapshot(board), raw=True)  # what a saved notebook keeps

    # -- building and drawing -----------------------------------------------------------------
    def _build(self, board: Board) -> None:
        w = self._w
        label_width = min(LABEL_WIDTH, max(8, *(len(r.label) for r in board.rows)))
        lines = [self._row(row, label_width) for row in board.rows]
        self._failures = w.HTML("", layout=w.Layout(display="none")) if board.aggregate else None
        self.widget = w.VBox(lines + ([self._failures] if self._failures is not None else []))

    def _row(self, row: Row, label_width: int) -> Any:
        w = self._w
        label = w.HTML(_label_html(row.label, label_width))
        bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(flex="1 1 auto", width="auto"))
        parts: dict[str, Any] = {"label": label, "bar": bar}
        if self.aggregate:
            # The failed tasks' part of the bar, red, at its end; the rest is the done part.
            bad = w.FloatProgress(
                value=1.0, min=0.0, max=1.0, bar_style="danger", layout=w.Layout(width="auto", display="none")
            )
            parts["bad"] = bad
            gauge: Any = w.HBox([bar, bad], layout=w.Layout(flex="1 1 auto", width="auto"))
        else:
            gauge = bar
        width = _counts_width(row)
        counts = w.HTML(_counts_html(row.counts(), width))
        parts["counts"], parts["width"] = counts, width
        detail = w.HTML("", layout=w.Layout(display="none", margin=f"0 0 0 calc({label_width}ch + 8px)"))
        parts["detail"] = detail
        self._rows.append(parts)
        return w.VBox([w.HBox([label, gauge, counts], layout=w.Layout(width="100%")), detail])

    def _render(self, row: Row, parts: dict[str, Any]) -> None:
        bar = parts["bar"]
        with bar.hold_sync():  # one message per bar, not one per trait
            if self.aggregate:
                self._render_aggregate(row, parts)
            elif row.total:
                bar.max = float(row.total)
                bar.value = min(float(row.current), float(row.total))
            elif row.state is None:
                bar.max, bar.value = 1.0, 1.0  # unknown total: a full "info" bar, as tqdm.notebook
            if row.state is None:
                bar.bar_style = "info" if not row.total else ""
            elif row.state == TaskState.CANCELLED:
                bar.bar_style = ""
                bar.style.bar_color = GREY
            elif self.aggregate:
                bar.bar_style = "success" if row.done else ""
            else:
                bar.bar_style = STYLES.get(row.state, "")
                if row.state == TaskState.DONE and not row.total:
                    bar.max, bar.value = 1.0, 1.0
        parts["width"] = max(parts["width"], _counts_width(row))  # only ever wider: the bar stays put
        counts = _counts_html(row.counts(), parts["width"])
        if parts["counts"].value != counts:
            parts["counts"].value = counts
        detail = _detail_html(row)
        if parts["detail"].value != detail:
            parts["detail"].value = detail
            parts["detail"].layout.display = None if detail else "none"

    def _render_aggregate(self, row: Row, parts: dict[str, Any]) -> None:
        bar, bad = parts["bar"], parts["bad"]
        total = int(row.total or 1)
        share = max(total - row.failed, 0)  # of the width: the tasks not failed
        bar.max, bar.value = float(max(share, 1)), float(row.done)
        bar.layout.flex = f"{share} 1 0%"
        bar.layout.display = None if share else "none"
        with bad.hold_sync():
            bad.layout.flex = f"{row.failed} 1 0%"
            bad.layout.display = None if row.failed else "none"


def snapshot(board: Board) -> dict[str, str]:
    """A still picture of the bars: ``text/html`` drawn as the widgets are, and ``text/plain``."""
    from ..textview import text_line

    label_width = min(LABEL_WIDTH, max(8, *(len(r.label) for r in board.rows)))
    rows = []
    for row in board.rows:
        rows.append(
            '<div style="display: flex; align-items: center; gap: 8px; margin: 2px 0">'
            f"{_label_html(row.label, label_width)}"
            '<div style="flex: 1 1 auto; display: flex; height: 1.4em; overflow: hidden; border-radius: 2px; '
            f'background: {TRACK}">{_fill_html(row)}</div>'
            f"{_counts_html(row.counts(), _counts_width(row))}</div>"
        )
        detail = _detail_html(row)
        if detail:
            rows.append(f'<div style="margin: 0 0 4px calc({label_width}ch + 8px)">{detail}</div>')
    if board.aggregate and board.failures:
        rows.append(_failure_list(board.failures))
    lines = [text_line(row, 100) for row in board.rows] + board.failures
    return {"text/html": f'<div class="rtq-progress">{"".join(rows)}</div>', "text/plain": "\n".join(lines)}


def _fill_html(row: Row) -> str:
    """The filled part of a still bar (an aggregate's: done, then failed in red)."""
    if row.state == TaskState.CANCELLED:
        colour = GREY
    else:
        colour = COLOURS.get(row.state or TaskState.RUNNING, COLOURS[TaskState.RUNNING])
    if row.failed:
        done = 100 * row.done / (row.total or 1)
        failed = 100 * row.failed / (row.total or 1)
        ok = COLOURS[TaskState.DONE] if row.state else COLOURS[TaskState.RUNNING]
        return (
            f'<div style="width: {done:.1f}%; background: {ok}">'
            f'</div><div style="flex: 1 1 auto"></div><div style="width: {failed:.1f}%; background: '
            f'{COLOURS[TaskState.FAILED]}"></div>'
        )
    full = 100 * row.fraction() if row.total else 100.0  # no total: a full bar, as the widget shows
    return f'<div style="width: {full:.1f}%; background: {colour}"></div>'


def _label_html(label: str, width: int) -> str:
    shown = html.escape(label)
    return (
        f'<span title="{shown}" style="display: inline-block; width: {width}ch; overflow: hidden; '
        f'text-overflow: ellipsis; white-space: nowrap; vertical-align: middle">{shown}</span>'
    )


def _counts_width(row: Row) -> int:
    """Characters the counts take at most, so their column keeps one width as they grow."""
    digits = len(str(int(row.total))) if row.total else 3  # a total known later seldom has more
    extra = len(f": {int(row.total or 0)} done, {int(row.total or 0)} failed") if row.unit == "task" else 0
    return 2 * digits + len(" [00:00<00:00,  999.99it/s]") + extra + 1


def _counts_html(counts: str, width: int) -> str:
    return f'<span style="{MONO}; display: inline-block; min-width: {width}ch">{html.escape(counts)}</span>'


def _detail_html(row: Row) -> str:
    """The line under a bar: how it failed, else its description and the line it writes now."""
    if row.state is not None and row.state != TaskState.DONE:
        colour = DIM if row.state == TaskState.CANCELLED else RED
        return f'<span style="{colour}">{html.escape(row.detail())}</span>'
    parts = []
    if row.description:
        parts.append(f'<span style="{DIM}">{html.escape(row.description)}</span>')
    if row.line.strip():
        parts.append(f'<span style="{MONO}; {DIM}">{html.escape(row.line.strip())}</span>')
    return " &nbsp; ".join(parts)


def _failure_list(lines: list[str]) -> str:
    shown = lines[:50]
    more = f"<li>... and {len(lines) - len(shown)} more</li>" if len(lines) > len(shown) else ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in shown)
    return f'<b style="{RED}">{len(lines)} failed</b><ul>{items}{more}</ul>'
