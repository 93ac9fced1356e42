"""The kernel's sessions: ``%%rtq --session S`` cells, ``%rtq session``, ``pull``, ``push`` and ``close``.

A session named ``S`` is opened by the first ``%%rtq NAME --session S`` cell, on a worker
serving NAME with room for it, and stays in that worker process: what its cells assign stays
there, the names a cell reads that ``S`` does not hold are shipped from the notebook, and only
``--pull``-ed names come back. Once it is lost (its worker died or stopped, it expired idle, it
was closed elsewhere) every cell aimed at it raises :class:`~rtq.errors.SessionLost`, until
``%rtq session close S`` forgets it: a session is never silently re-created empty. When the
kernel shuts down its sessions are closed.

The worker's half is :mod:`rtq.notebook.session_cells`.
"""

from __future__ import annotations

import atexit
import sys
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

from ..backend.keys import check_name
from ..calls import Call
from ..errors import SerializationError, SessionLost, SessionRefused
from ..serialization import describe_unpicklable, size_text
from ..sessions import SessionHandle
from .cells import CellResult, ShippedValues
from .devices import notebook_has_cuda
from .session_cells import missing_names, pull_names, push_names
from .tracebacks import short_error

if TYPE_CHECKING:
    from .waiting import CellExecutor

__all__ = ["NotebookSessions", "check_session_name"]

SHUTDOWN_REASON = "closed: its notebook kernel shut down"


def check_session_name(value: str, where: str = "%%rtq --session") -> str:
    """A session name as given (unquoted), or a ``UsageError`` naming what is wrong with it."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # IPython's magic arguments keep the quotes: --session "" is empty
    try:
        return check_name("session name", value)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


class NotebookSessions:
    """The sessions one ``%rtq connect`` opened, by name.

    Args:
        executor: Makes the executor of a queue name (the connection's).
    """

    def __init__(self, executor: Any) -> None:
        self._executor = executor
        self.handles: dict[str, SessionHandle] = {}
        self._at_exit = False

    def executor(self, queue: str, timeout: float | None = None) -> CellExecutor:
        ex: CellExecutor = self._executor(queue, timeout)
        return ex

    # -- opening and finding ---------------------------------------------------------------
    def for_cell(self, name: str, queue: str) -> SessionHandle:
        """The session ``name`` (opened on ``queue`` now if the kernel has none by that name)."""
        handle = self.handles.get(name)
        if handle is not None:
            if handle.executor.name != queue:
                raise UsageError(
                    f"%%rtq: session {name!r} lives on queue {handle.executor.name!r}, not {queue!r}: run its cells "
                    f"with %%rtq {handle.executor.name} --session {name} (or %rtq session close {name} first)"
                )
            return handle
        try:
            handle = SessionHandle.open(self.executor(queue), "cell", name)
        except SessionRefused as exc:
            raise UsageError(f"%%rtq --session {name}: {exc}") from None
        self.handles[name] = handle
        if not self._at_exit:  # after the embedded server's own exit hook: this one runs first
            atexit.register(self.close_all, SHUTDOWN_REASON)
            self._at_exit = True
        return handle

    def get(self, name: str, where: str) -> SessionHandle:
        handle = self.handles.get(name)
        if handle is None:
            known = ", ".join(repr(n) for n in self.handles) or "none"
            raise UsageError(
                f"{where}: this kernel has no session {name!r} (its sessions: {known}); "
                f"a cell run with %%rtq [NAME] --session {name} opens it"
            )
        return handle

    @staticmethod
    def lost(exc: SessionLost, name: str) -> BaseException:
        """A lost session's error, shown as one line saying how to go on."""
        return short_error(
            exc, f"{exc}. %rtq session close {name} forgets it; the next --session {name} cell opens a new one"
        )

    # -- the line commands -----------------------------------------------------------------
    def show(self) -> None:
        """``%rtq session``: each session's worker, host, GPU, age, idle time and the names it holds."""
        if not self.handles:
            print("rtq: no sessions in this kernel; %%rtq [NAME] --session S opens one")
            return
        handles = list(self.handles.items())
        states = handles[0][1].records.states([(h.id, h.worker) for _, h in handles])
        now = time.time()
        for (name, handle), state in zip(handles, states, strict=True):
            reason = handle.reason_lost(state) if handle.lost is None else str(handle.lost)
            where = f"worker {handle.worker} on {handle.host}"
            gpu = state.record.get("gpu") or handle.where.get("gpu") or ""
            if gpu:
                where += f", GPU {gpu}"
            if reason:
                print(f"session {name!r} (queue {handle.executor.name!r}): LOST, {where}: {reason}")
                continue
            used = _float(state.record.get("used"), handle.opened)
            calls = state.record.get("calls", "0")
            print(
                f"session {name!r} (queue {handle.executor.name!r}): {where}; age {_ago(now - handle.opened)}, "
                f"idle {_ago(now - used)}, {calls} call(s)"
            )
            names = state.names
            if not names:
                print("    (holds no names yet)")
            width = max((len(str(n)) for n, _, _ in names), default=0)
            for held, type_name, size in names:
                print(f"    {held!s:<{width}}  {type_name}  {size_text(int(size))}")

    def close(self, name: str) -> None:
        """``%rtq session close S``: close it after its queued cells; a lost one is just forgotten."""
        handle = self.get(name, "%rtq session close")
        del self.handles[name]
        try:
            handle.close(reason="closed: %rtq session close in its notebook")
        except SessionLost:
            pass
        print(f"rtq: closed session {name!r}")

    def close_all(self, reason: str = SHUTDOWN_REASON) -> None:
        """Close every session without waiting (the kernel shuts down, or the connection changes)."""
        handles, self.handles = list(self.handles.values()), {}
        for handle in handles:
            try:
                handle.close(wait=False, reason=reason)
            except Exception:  # the kernel is going: a session it cannot reach expires idle on its worker
                pass

    def pull(self, shell: Any, name: str, names: tuple[str, ...]) -> None:
        """``%rtq pull S a b``: bring names from the session into the notebook."""
        handle = self.get(name, "%rtq pull")
        if not names:
            raise UsageError("%rtq pull: name the variables to bring back: %rtq pull S a b")
        try:
            state = handle.check()
        except SessionLost as exc:
            raise self.lost(exc, name) from None
        have = {str(n[0]) for n in state.names}
        missing = [n for n in names if n not in have]
        if missing:
            raise UsageError(f"%rtq pull: {missing_names(name, missing, state.names)}")
        fut = handle.submit(Call(pull_names, (names, not notebook_has_cuda()), label=f"pull {name}"[:40]))
        try:
            result = fut.result()
        except SessionLost as exc:
            raise self.lost(exc, name) from None
        assert isinstance(result, CellResult)
        shell.user_ns.update(result.values)
        for held, why in result.skipped.items():
            print(f"rtq: {held!r} stays in session {name!r}: {why}", file=sys.stderr)
        if result.modules:
            import importlib

            for held, module in result.modules.items():
                shell.user_ns[held] = importlib.import_module(module)
        handle.held = result.held or handle.held

    def push(self, shell: Any, name: str, names: tuple[str, ...]) -> None:
        """``%rtq push S a b``: put notebook variables into the session (replacing what it held)."""
        handle = self.get(name, "%rtq push")
        if not names:
            raise UsageError("%rtq push: name the variables to send: %rtq push S a b")
        ns = shell.user_ns
        undefined = [n for n in names if n not in ns]
        if undefined:
            raise UsageError(f"%rtq push: not defined in the notebook: {', '.join(undefined)}")
        values = ShippedValues()
        for n in names:
            try:
                values.add(n, ns[n])
            except Exception as exc:
                err = SerializationError(describe_unpicklable(ns[n], f"variable {n!r}", exc))
                raise short_error(err, str(err)) from None
        try:
            held = handle.submit(Call(push_names, (values,), label=f"push {name}"[:40])).result()
        except SessionLost as exc:
            raise self.lost(exc, name) from None
        handle.held = held


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value else default
    except ValueError:
        return default


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"
