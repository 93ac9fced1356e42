"""Waiting on a ``%%rtq`` cell: live output, a progress bar, its variables, its interruption.

A cell's :class:`CellFuture` resolves to a :class:`~rtq.notebook.cells.CellResult`. Reading it
(``result()``, which ``%%rtq`` and ``%rtq wait`` do) is what assigns the cell's variables into
the notebook, so a ``--no-wait`` cell never changes the namespace while other cells run.

While the kernel waits, :func:`wait_cell` follows the task's events in the kernel's main thread
(:func:`rtq.display.follow_cell`), so what the cell prints lands in the cell that is running,
and the bar ``rtq.progress`` shows (a widget; text where widgets are off) appears above that
output once the cell has run for ``progress_after`` seconds and reported progress, turning
green when it ends, red when it fails or is interrupted. A ``KeyboardInterrupt`` (the kernel's
interrupt button) stops the remote cell.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..calls import Call
from ..display import follow_cell
from ..errors import RtqError, TaskTimeout
from ..executor import Executor, TaskFuture
from ..frames import remote_frames
from ..task import TaskState
from .cells import CellResult, CellSpec, run_cell
from .session_cells import missing_names, run_session_cell
from .tracebacks import prepare, short_error

if TYPE_CHECKING:
    from ..sessions import SessionHandle

__all__ = ["CellExecutor", "CellFuture", "RemoteModule", "deferred_interrupts", "wait_cell"]


class RemoteModule:
    """Stands in for a module a remote cell imported that this kernel cannot import.

    A later ``%%rtq`` cell that reads the name imports the module on the worker again.
    """

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (imported on the worker; not installed in this kernel)>"

    def __getattr__(self, attr: str) -> Any:
        raise AttributeError(f"module {self.__name__!r} is only installed on the workers: use it in %%rtq cells")


class CellFuture(TaskFuture):
    """The future of a ``%%rtq`` cell: ``result()`` brings the cell's variables into the notebook.

    ``result()`` returns the value of the cell's last expression (None when there is none),
    assigns the variables the cell made (once, however often it is called), and raises the
    cell's exception shown against the cell's own lines.
    """

    _cell: CellContext | None = None

    def result(self, timeout: float | None = None) -> Any:
        try:
            outcome = super().result(timeout)
        except BaseException as exc:
            if self._cell is not None and self.done() and not self.cancelled():
                prepare(exc, self._cell.shell)
            raise
        if self._cell is None or not isinstance(outcome, CellResult):
            return outcome
        return self._cell.apply(outcome)

    def __repr__(self) -> str:
        if not self.done():
            state = "running; .result() (or %rtq wait NAME) brings its variables back"
        elif self.cancelled():
            state = TaskState.CANCELLED
        else:
            state = TaskState.FAILED if self.exception() else TaskState.DONE
        what = self.label or "rtq cell"
        return f"<{what} on {self.name!r} (task {self.task_id}): {state}>"


class CellExecutor(Executor):
    """An executor whose futures are :class:`CellFuture` objects."""

    future_class = CellFuture

    def submit_cell(self, spec: CellSpec, label: str) -> CellFuture:
        """Ship a cell; ``label`` names it in its bar and in ``rtq status`` (``%%rtq cell In[12]``)."""
        fut = self._submit_calls([Call(run_cell, (spec,), label=label)])[0]
        assert isinstance(fut, CellFuture)
        return fut

    def submit_session_cell(self, session: SessionHandle, spec: CellSpec, label: str) -> CellFuture:
        """Ship a cell to run in ``session``'s namespace (on its worker process alone)."""
        fut = session.submit(Call(run_session_cell, (spec,), label=label), executor=self)
        assert isinstance(fut, CellFuture)
        return fut


class CellContext:
    """Where a cell's variables go when its future's result is read."""

    def __init__(self, shell: Any, pull: tuple[str, ...], explicit: bool, session: SessionHandle | None = None) -> None:
        self.shell = shell
        self.pull = pull
        self.explicit = explicit
        self.session = session  # a --session cell's: what it holds is updated from the result
        self._lock = threading.Lock()
        self._applied = False

    def apply(self, outcome: CellResult) -> Any:
        with self._lock:
            if not self._applied:
                self._applied = True
                self._assign(outcome)
        return outcome.value if outcome.has_value else None

    def _assign(self, outcome: CellResult) -> None:
        ns = self.shell.user_ns
        ns.update(outcome.values)
        for name, module in outcome.modules.items():
            try:
                ns[name] = importlib.import_module(module)
            except ImportError:
                ns[name] = RemoteModule(module)
        for name, why in outcome.skipped.items():
            print(f"rtq: {name!r} stays on the worker: {why}", file=sys.stderr)
        if self.session is not None and outcome.held is not None:
            self.session.held = outcome.held
        if self.explicit:
            got = set(outcome.values) | set(outcome.modules) | set(outcome.skipped)
            missing = [n for n in self.pull if n not in got]
            if missing and self.session is not None:
                print(f"rtq: --pull: {missing_names(self.session.label, missing, outcome.held or [])}", file=sys.stderr)
            elif missing:
                print(f"rtq: --pull {', '.join(missing)}: not defined when the cell ended", file=sys.stderr)


class deferred_interrupts:
    """Hold a ``KeyboardInterrupt`` back while the block runs (main thread only); ``hit`` tells.

    Submitting a cell is a Redis transaction: interrupted halfway, the cell may be queued (even
    running) with no future to stop it by. Deferring the interrupt until the future exists
    lets the caller stop the cell it just sent.
    """

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> deferred_interrupts:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def wait_cell(
    fut: CellFuture,
    *,
    progress_after: float | None,
    stop_on_interrupt: bool,
    label: str = "",
    interrupted: bool = False,
) -> Any:
    """Wait for a cell in the kernel, showing what it prints; returns its last expression's value.

    Args:
        fut: The cell's future.
        progress_after: Show a progress bar above the output once the cell has run this many
            seconds and reported progress (None: never).
        stop_on_interrupt: On ``KeyboardInterrupt`` stop the remote cell (a ``%%rtq`` cell);
            else only stop waiting (``%rtq wait`` on a ``--no-wait`` cell).
        label: How the user refers to the handle, for messages.
        interrupted: An interrupt already came (while submitting): handle it at once.
    """
    try:
        if interrupted:
            raise KeyboardInterrupt
        try:
            follow_cell(fut, show_after=progress_after).follow()  # the bar and the output; red if interrupted
        except (RtqError, OSError, ValueError):  # following is a nicety; the outcome is what counts
            pass
        return fut.result()
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            raise short_error(
                KeyboardInterrupt(),
                f"stopped waiting; the cell still runs (task {fut.task_id}): {label or 'its handle'}.stop() stops it",
            ) from None
        fut.stop()
        raise short_error(
            KeyboardInterrupt(), f"stopped the remote cell (task {fut.task_id} on {fut.name!r})"
        ) from None
    except TaskTimeout as exc:
        if remote_frames(exc) is not None:  # raised by the cell's own code
            raise
        limit = getattr(fut._executor, "timeout", None)
        raise short_error(
            exc, f"the cell ran past its {limit:g} s timeout on {fut.name!r} and was stopped (task {fut.task_id})"
        ) from None
    except RtqError as exc:
        if getattr(exc, "_render_traceback_", None) is None:
            short_error(exc, str(exc))
        raise
