"""Text bars: the rows of :class:`rtq.display.Progress` as tqdm lines, and a terminal's view of output.

:class:`TextView` is the text rendering of :class:`rtq.board.View`: on a terminal, a block of
lines at the bottom of stderr redrawn in place (as tqdm redraws bars with ``position``) with the
tasks' output printed above it; in a Jupyter kernel without widgets, one text display in the
cell, updated in place above the output. :class:`Screen` is what a terminal shows of a stream
that redraws its line with ``\\r`` (a library's own tqdm): how ``rtq.progress`` renders the
tasks' output in every medium.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .task import TaskState

if TYPE_CHECKING:
    from .board import Board, Row

__all__ = ["Screen", "TextView", "in_kernel", "text_line"]


class Screen:
    """What a terminal shows of one stream, given as the lines it can no longer change.

    ``\\r`` returns to the start of the line and what follows overwrites it; ``\\n`` moves to
    the next line; ``ESC[nA`` (cursor up, as tqdm draws a bar on a line of its own) moves back
    up and ``ESC[K`` erases to the end of the line. Other escape sequences (colours) are kept as
    text. A line is given out once the cursor is further below it than the stream ever moved up,
    so a plain stream gives out each line as it ends, and a bar redrawn in place on the line
    under the cursor is given out once, when the stream ends (:meth:`flush`).

    Attributes:
        line: The line the cursor is on (what a live view shows as being written).
    """

    _TOKENS = re.compile(r"(\r\n|\n|\r|\x1b\[[0-9]*[AK])")

    def __init__(self) -> None:
        self._lines = [""]  # from the first line the cursor can still reach, down
        self._row = 0
        self._col = 0
        self._reach = 0  # the furthest the stream moved up

    @property
    def line(self) -> str:
        return self._lines[self._row]

    def feed(self, chunk: str) -> list[str]:
        """Write ``chunk``; returns the lines it put out of the cursor's reach, in order."""
        done: list[str] = []
        for token in self._TOKENS.split(chunk):
            if not token:
                continue
            if token in ("\n", "\r\n"):
                self._row += 1
                self._col = 0
                if self._row == len(self._lines):
                    self._lines.append("")
                while self._row > self._reach:
                    done.append(self._lines.pop(0))
                    self._row -= 1
            elif token == "\r":
                self._col = 0
            elif token.startswith("\x1b["):
                if token.endswith("K"):
                    self._lines[self._row] = self._lines[self._row][: self._col]
                else:
                    up = int(token[2:-1] or 1)
                    self._reach = max(self._reach, up)
                    self._row = max(0, self._row - up)
            else:
                line = self._lines[self._row].ljust(self._col)
                self._lines[self._row] = line[: self._col] + token + line[self._col + len(token) :]
                self._col += len(token)
        return done

    def flush(self) -> list[str]:
        """The stream ended: the lines still in reach, the blank ones the cursor only passed left out."""
        lines = [line for line in self._lines if line.strip()]
        self.__init__()  # type: ignore[misc]
        return lines


class TextView:
    """tqdm lines: redrawn in place on a terminal's stderr, or one text display in a kernel.

    On a terminal the bars are a block of lines at the bottom, redrawn in place (as tqdm does
    with ``position``), with the tasks' output printed above it; each row's times freeze when it
    ends, and the final block stays, in order, followed by the failures. Where stderr is not a
    terminal, only the final lines are printed. In a Jupyter kernel (widgets off) the block is a
    text display in the cell, updated in place, above the output.

    Args:
        notebook: Show the bars as a display in the running cell (default: in a kernel).
    """

    COLOURS: dict[str, str] = {
        TaskState.DONE: "green",
        TaskState.FAILED: "red",
        TaskState.LOST: "red",
        TaskState.INTERRUPTED: "red",
        TaskState.CANCELLED: "#808080",
    }
    MIN_GAP = 0.1  # seconds between two redraws of a text display (each is a message to the notebook)

    def __init__(self, *, notebook: bool | None = None) -> None:
        self.notebook = in_kernel() if notebook is None else notebook
        self._streams: dict[str, Any] = {}
        self._lock = threading.Lock()  # output and redraws come from one thread, but stay whole
        self._drawn = 0  # terminal: lines of the block on screen
        self._last_lines: list[str] = []  # terminal: the block on screen, redrawn after output
        self._handle: Any = None  # notebook: the text display
        self._shown_at = 0.0

    def start(self, board: Board) -> None:
        self._streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        if self.notebook and board.bars:
            from IPython.display import display

            # Placed now, before any output: the bars sit above what the tasks print.
            self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.update(board, range(len(board.rows)))

    def update(self, board: Board, indices: Iterable[int]) -> None:
        if not board.visible:
            return
        with self._lock:
            self._draw(board, final=False)

    def output(self, kind: str, text: str) -> None:
        stream = self._streams.get(kind) or sys.stdout
        with self._lock:
            if self.notebook or not self._tty():
                stream.write(text)
                stream.flush()
                return
            lines, self._last_lines = self._last_lines, []
            self._erase()
            stream.write(text)
            stream.flush()
            self._paint(lines)
            self._last_lines = lines

    def finish(self, board: Board) -> None:
        if not board.visible:
            return
        with self._lock:
            self._draw(board, final=True)

    # -- drawing ------------------------------------------------------------------------------
    def _tty(self) -> bool:
        err = self._streams.get("stderr")
        return bool(err is not None and getattr(err, "isatty", lambda: False)())

    def _draw(self, board: Board, *, final: bool) -> None:
        tty = self._tty()
        width = _columns()
        lines = [text_line(row, width, colour=self.COLOURS.get(row.state or "") if tty else None) for row in board.rows]
        if final:
            lines += board.failures
        if self.notebook:
            now = time.monotonic()
            if self._handle is not None and (final or now - self._shown_at >= self.MIN_GAP):
                self._handle.update({"text/plain": "\n".join(lines)}, raw=True)
                self._shown_at = now
            return
        err = self._streams["stderr"]
        if not tty:  # a file or a pipe: no redrawing, only the final lines
            if final:
                err.write("".join(line + "\n" for line in lines))
                err.flush()
            return
        self._erase()
        self._paint(lines)
        self._last_lines = lines
        if final:
            err.write("\n")
            self._drawn = 0
        err.flush()

    def _paint(self, lines: list[str]) -> None:
        self._streams["stderr"].write("\n".join("\r" + line + "\x1b[K" for line in lines))
        self._drawn = len(lines)

    def _erase(self) -> None:
        """Move to the first line of the block on screen and clear it and what follows."""
        if self._drawn:
            up = f"\x1b[{self._drawn - 1}A" if self._drawn > 1 else ""
            self._streams["stderr"].write("\r" + up + "\x1b[J")
            self._drawn = 0


def text_line(row: Row, width: int, *, colour: str | None = None) -> str:
    """``label:  40%|████      | 4/10 [00:01<00:01, 4.00it/s] epoch 3`` in ``width`` columns."""
    from tqdm.std import tqdm

    detail = row.detail()
    tail = (" " + row.counts() + (f" {detail}" if detail else "")).replace("{", "{{").replace("}", "}}")
    bar_format = "{desc}: {percentage:3.0f}%|{bar}|" + tail if row.total else "{desc}:" + tail
    shown = row.current if row.total else 0
    return tqdm.format_meter(
        shown, row.total, row.elapsed, ncols=width, prefix=row.label, bar_format=bar_format, colour=colour
    )


def _columns() -> int:
    try:
        return max(40, min(os.get_terminal_size(sys.stderr.fileno()).columns, 200))
    except (OSError, ValueError, AttributeError):
        return 100


def in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (without importing IPython when nobody did)."""
    module = sys.modules.get("IPython")
    ip = module.get_ipython() if module is not None else None  # type: ignore[attr-defined]
    return ip is not None and getattr(ip, "kernel", None) is not None
