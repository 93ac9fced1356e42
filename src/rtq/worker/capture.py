"""Worker-side capture of what tasks print, per task, while several run in parallel threads.

A worker runs its tasks in a thread pool, so swapping ``sys.stdout`` around one task
(``contextlib.redirect_stdout``) would mix their outputs. Instead ``sys.stdout`` and
``sys.stderr`` are replaced once per process by a :class:`Router`, which sends each write made
by a task's thread to that task's buffer and every other write to the stream it replaced.
Logging handlers that wrote to the replaced streams are pointed at the routers, so a task's
``logging`` output is captured too, and so is a library's own tqdm bar (it writes to stderr).

Buffers go to the task's events stream (``scripts/output.lua``), where watchers read them in
order with the task's progress (:mod:`rtq.watch`). One flusher thread sends them: at once when
a task was quiet for ``FLUSH_INTERVAL``, else at most once per ``FLUSH_INTERVAL``, so a chatty
task costs a few writes a second, not one per ``print``. Pending output is also sent before each
progress report, and, when the task ends, by the task's own thread *before its outcome is
stored*: a caller has everything the task wrote, even just before a failure, when it learns
the task ended.

tqdm bars a task draws (a library's own) are placed among that task's bars only, as if the task
had the terminal alone: tqdm numbers the bars of a whole process, so a task's only bar would
otherwise draw on a lower line, with cursor moves, whenever another task of the worker has a bar
open.

Not captured: bytes written to ``sys.stdout.buffer``, writes to the file descriptors themselves
(C extensions, ``os.write(1, ...)``, subprocesses) and writes from threads the task starts;
those reach the worker's own output.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from threading import get_ident
from typing import TYPE_CHECKING, Any

from ..backend.claims import output_writer
from ..backend.connections import RedisError

if TYPE_CHECKING:
    from ..backend.store import TaskStore
    from .run import Run

__all__ = ["FLUSH_INTERVAL", "Router", "capturing", "install"]

logger = logging.getLogger("rtq.worker")

FLUSH_INTERVAL = 0.05
"""Seconds between two output writes of one task; writes in between are batched."""
MAX_ENTRY = 64 * 1024
"""Longest text (characters) of one stream entry; longer output is split."""
MAX_PENDING = 4 * 1024 * 1024
"""Characters a task may have buffered; past that its own ``write`` sends them (backpressure)."""

# thread ident -> the sink of the task that thread runs
_sinks: dict[int, _Sink] = {}
_install_lock = threading.Lock()


class Router:
    """Stands in for ``sys.stdout`` or ``sys.stderr``: a task thread's writes go to its task.

    Args:
        kind: ``"stdout"`` or ``"stderr"``: how the task's watchers see the text.
        target: The stream it replaced, which gets every write made outside a task.
    """

    def __init__(self, kind: str, target: Any) -> None:
        self.kind = kind
        self.target = target

    def write(self, text: str) -> int:
        sink = _sinks.get(get_ident())
        if sink is None:
            return self.target.write(text)  # type: ignore[no-any-return]
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        return sink.write(self.kind, text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if get_ident() not in _sinks:
            self.target.flush()

    def isatty(self) -> bool:
        # A task's output is read remotely, never by a terminal: libraries keep it plain.
        return get_ident() not in _sinks and bool(self.target.isatty())

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, ...
        return getattr(self.target, name)


def install() -> None:
    """Put routers in place of ``sys.stdout``/``sys.stderr`` (again, if someone replaced them)."""
    with _install_lock:
        _place_bars_per_task()
        for kind in ("stdout", "stderr"):
            current = getattr(sys, kind)
            if current is None or isinstance(current, Router):
                continue
            router = Router(kind, current)
            setattr(sys, kind, router)
            _repoint_handlers(current, router)


def _place_bars_per_task() -> None:
    """Make tqdm number a task's bars among that task's own (see the module docstring); once."""
    from tqdm.std import tqdm

    if getattr(tqdm, "_rtq_per_task", False):
        return
    whole_process = tqdm._get_free_pos

    def free_position(cls: Any, instance: Any = None) -> int:
        me = get_ident()
        if me not in _sinks:  # not a task's thread: tqdm's own numbering
            return whole_process(instance)  # type: ignore[no-any-return]
        if instance is not None:
            instance._rtq_thread = me
        taken = {
            abs(bar.pos)
            for bar in cls._instances
            if bar is not instance and hasattr(bar, "pos") and getattr(bar, "_rtq_thread", None) == me
        }
        return min(set(range(len(taken) + 1)) - taken)

    tqdm._get_free_pos = classmethod(free_position)  # type: ignore[assignment,method-assign]
    tqdm._rtq_per_task = True  # type: ignore[attr-defined]


def _repoint_handlers(old: Any, new: Router) -> None:
    """Point logging handlers bound to ``old`` (the worker's own ``basicConfig``) at ``new``."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for log in loggers:
        for handler in getattr(log, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


class _Sink:
    """The output buffer of one running task, in write order, batched by kind."""

    def __init__(self, send: Callable[[list[str]], Any], shield: Callable[[], AbstractContextManager[Any]]) -> None:
        self._send = send
        self._shield = shield  # held while the task's own thread talks to Redis
        self._owner = get_ident()
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one send at a time keeps the stream in write order
        self._runs: list[tuple[str, list[str]]] = []  # (kind, texts) runs of one kind each
        self._size = 0
        self._scheduled = False
        self._last_sent = 0.0

    def write(self, kind: str, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            if kind == "desc" and self._runs and self._runs[-1][0] == "desc":
                self._runs[-1] = ("desc", [text])  # only the newest description matters
            elif self._runs and self._runs[-1][0] == kind and kind != "desc":
                self._runs[-1][1].append(text)
            else:
                self._runs.append((kind, [text]))
            self._size += len(text)
            if not self._scheduled:
                self._scheduled = True
                _flusher.schedule(self, max(time.monotonic(), self._last_sent + FLUSH_INTERVAL))
            flood = self._size > MAX_PENDING
        if flood and get_ident() == self._owner:
            self.flush()
        return len(text)

    def describe(self, description: str) -> None:
        self.write("desc", description)

    @property
    def pending(self) -> bool:
        return bool(self._runs)

    def flush(self) -> None:
        """Send what is buffered now, from any thread."""
        with self._sending:
            with self._lock:
                runs, self._runs, self._size, self._scheduled = self._runs, [], 0, False
            if not runs:
                return
            entries: list[str] = []
            for kind, texts in runs:
                joined = "".join(texts)
                for start in range(0, len(joined), MAX_ENTRY):
                    entries += [kind, joined[start : start + MAX_ENTRY]]
            shield = self._shield if get_ident() == self._owner else nullcontext
            try:
                with shield():
                    self._send(entries)
            except RedisError as exc:
                # Redis away for a moment: the task goes on; this much of its output is lost.
                logger.warning("could not send %d characters of task output (%s)", sum(map(len, entries[1::2])), exc)
            self._last_sent = time.monotonic()


class _Flusher:
    """One daemon thread that sends each task's buffer when it falls due."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, _Sink]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, sink: _Sink, when: float) -> None:
        with self._cond:
            heapq.heappush(self._due, (when, next(self._seq), sink))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rtq-output", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, sink = heapq.heappop(self._due)
            try:
                sink.flush()
            except Exception:  # the flusher serves every task: it must outlive any one failure
                logger.exception("could not send task output")


_flusher = _Flusher()


@contextmanager
def capturing(store: TaskStore, run: Run, worker_id: str = "") -> Iterator[None]:
    """Capture what the current thread writes while the block runs, as ``run``'s output.

    The sink is ``run.output`` meanwhile: the run sends pending output before each progress
    report (so a watcher sees them in the order they happened), and routes ``rtq.tqdm``
    descriptions to the watchers. On exit everything left is sent before returning: exit the
    block before storing the task's outcome.

    Args:
        store: The task store of the task's queue (its client and scripts).
        run: The attempt the current thread runs (its attempt and token fence the writes).
        worker_id: The worker that claimed the task ('' leaves the writes unfenced).
    """
    install()
    send = output_writer(store, run.id, worker_id, str(run.attempt), run.token)
    sink = _Sink(send, run.stopper.shielded)
    ident = get_ident()
    outer = _sinks.get(ident)
    _sinks[ident] = sink
    run.output = sink
    try:
        yield
    finally:
        if outer is None:
            _sinks.pop(ident, None)
        else:
            _sinks[ident] = outer
        run.output = None
        sink.flush()
