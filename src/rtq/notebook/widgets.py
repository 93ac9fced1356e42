"""Widget bars for :func:`rtq.progress` in Jupyter (ipywidgets, imported only when one is built).

The widgets are created and displayed in the thread that called ``rtq.progress``, so they land
in that cell; afterwards a background thread only sets their models' traits (ipywidgets 8 sends
those updates from any thread). The tasks' output goes into an ``ipywidgets.Output`` displayed
with the bars, through ``append``-style updates of its model, never through ``print``: a print
from a background thread would land in whichever cell runs at that moment, or nowhere.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..display import Row

__all__ = ["WidgetView"]

MAX_OUTPUT = 200_000
"""Characters of task output kept in the widget; older text is dropped first."""
STYLES = {"done": "success", "failed": "danger", "lost": "danger"}
GREY = "#9e9e9e"


class WidgetView:
    """One row (label, bar, counts) per :class:`~rtq.display.Row`, a failure list and an output area.

    Raises:
        ImportError: ipywidgets (or IPython) is not installed.
    """

    raw_output = True

    def __init__(self, rows: list[Row], *, aggregate: bool = False, output: bool = True) -> None:
        import ipywidgets as w
        from IPython.display import display

        self.labels: list[Any] = []
        self.bars: list[Any] = []
        self.counts: list[Any] = []
        lines = []
        for row in rows:
            label = w.HTML(html.escape(row.title), layout=w.Layout(width="auto", max_width="40%"))
            bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info", layout=w.Layout(flex="1 1 auto"))
            counts = w.HTML(html.escape(row.counts()))
            self.labels.append(label)
            self.bars.append(bar)
            self.counts.append(counts)
            lines.append(w.HBox([label, bar, counts], layout=w.Layout(width="100%")))
        self.failure_list = w.HTML("") if aggregate else None
        self.output = w.Output() if output else None
        children = lines + [x for x in (self.failure_list, self.output) if x is not None]
        self.box = w.VBox(children)
        display(self.box)

    def render(self, rows: list[Row], indices: Iterable[int]) -> None:
        for i in indices:
            row, bar = rows[i], self.bars[i]
            with bar.hold_sync():  # one message per bar, not one per trait
                if row.total:
                    bar.max = float(row.total)
                    bar.value = min(float(row.current), float(row.total))
                elif row.state is None:
                    bar.max, bar.value = 1.0, 1.0  # unknown total: a full "info" bar, as tqdm.notebook
                if row.state is None:
                    bar.bar_style = "info" if not row.total else ""
                elif row.state == "cancelled":
                    bar.bar_style = ""
                    bar.style.bar_color = GREY
                else:
                    bar.bar_style = STYLES.get(row.state, "")
                    if row.state == "done" and not row.total:
                        bar.max, bar.value = 1.0, 1.0
            self.labels[i].value = html.escape(row.title)
            self.counts[i].value = html.escape(row.counts())

    def write(self, kind: str, text: str) -> None:
        if self.output is None:
            return
        outputs = list(self.output.outputs)
        last = outputs[-1] if outputs else None
        if last is not None and last.get("output_type") == "stream" and last.get("name") == kind:
            outputs[-1] = {**last, "text": last["text"] + text}
        else:
            outputs.append({"output_type": "stream", "name": kind, "text": text})
        size = sum(len(o.get("text", "")) for o in outputs)
        while size > MAX_OUTPUT and outputs:
            first = outputs[0]
            cut = min(len(first["text"]), size - MAX_OUTPUT)
            if cut >= len(first["text"]):
                outputs.pop(0)
            else:
                outputs[0] = {**first, "text": first["text"][cut:]}
            size -= cut
        self.output.outputs = tuple(outputs)

    def failures(self, lines: list[str]) -> None:
        if self.failure_list is None:
            return
        shown = lines[:50]
        more = f"<li>... and {len(lines) - len(shown)} more</li>" if len(lines) > len(shown) else ""
        items = "".join(f"<li>{html.escape(line)}</li>" for line in shown)
        self.failure_list.value = f"<b>{len(lines)} failed</b><ul>{items}{more}</ul>"

    def close(self) -> None:
        pass  # the bars stay, showing how the tasks ended
