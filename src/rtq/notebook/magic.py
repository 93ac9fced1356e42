"""The ``%rtq`` line magic and the ``%%rtq`` cell magic (``%load_ext rtq``).

``%%rtq [NAME]`` runs a cell on a worker listening on queue NAME, as one shipped call of
:func:`rtq.notebook.cells.run_cell`: the cell's free variables travel with it, the variables it
assigns come back into the notebook, and its last expression is displayed here. The cell's
source is registered in IPython's compiler cache, so a remote traceback points at the cell's
own lines. A ``--no-wait`` cell returns its :class:`CellFuture` at once; its variables arrive
when the notebook waits on it (``%rtq wait NAME`` or ``NAME.result()``), never behind the
user's back while other cells run.

User mistakes (an unknown option, no connection, a queue no worker serves, an undefined
``--push`` name) raise IPython's ``UsageError``, which the notebook shows as one line.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import types
from typing import TYPE_CHECKING, Any

from IPython.core import magic as _ipython_magic
from IPython.core.displayhook import DisplayHook
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..backend.keys import check_name
from ..closures import ship_local_modules
from ..connection import connect, redact_url
from ..culprits import describe_unpicklable
from ..errors import RtqError, SerializationError, SessionLost
from .cells import CellSpec, ShippedValues, analyze
from .devices import notebook_has_cuda
from .session_magic import NotebookSessions, check_session_name
from .tracebacks import short_error
from .waiting import CellContext, CellExecutor, CellFuture, RemoteModule, deferred_interrupts, wait_cell

if TYPE_CHECKING:
    from ..sessions import SessionHandle

# IPython < 8.12 lacks it: a trailing `;` then silences nothing.
output_can_be_silenced: Any = getattr(_ipython_magic, "output_can_be_silenced", lambda fn: fn)


__all__ = ["CellFuture", "RemoteModule", "RtqMagics", "load_ipython_extension", "unload_ipython_extension"]

DEFAULT_QUEUE = "default"
WORKER_START_TIMEOUT = 60.0
WAIT_PROGRESS_AFTER = 2.0
"""Seconds ``%rtq wait`` waits before it shows the cell's bar (as ``%%rtq``'s default)."""


class _Session:
    """One ``%rtq connect``: the queue, the executors per (queue name, timeout), a local worker."""

    def __init__(self, queue: Any, url: str, default: str) -> None:
        self.queue = queue
        self.url = url
        self.default = default
        self.executors: dict[tuple[str, float | None], CellExecutor] = {}
        self.worker: subprocess.Popen[bytes] | None = None
        self.sessions = NotebookSessions(self.executor)

    def executor(self, name: str, timeout: float | None) -> CellExecutor:
        key = (name, timeout)
        if key not in self.executors:
            self.executors[key] = CellExecutor(self.queue, name, timeout=timeout)
        return self.executors[key]

    def served_queues(self) -> set[str]:
        """Queue names live workers serve (from their heartbeat records)."""
        served: set[str] = set()
        for record in self.queue.live_workers():
            served.update(record.get("queues", []))
        return served

    def close(self, reason: str = "closed: its notebook reconnected (%rtq connect)") -> None:
        """Close its sessions; stop submitting; cells already sent still finish and can still be waited on."""
        self.sessions.close_all(reason)
        for ex in self.executors.values():
            ex.shutdown(wait=False)
        self.executors.clear()
        stop_worker(self.worker)
        self.worker = None


def stop_worker(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a worker this kernel started (SIGTERM lets it finish, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n for n in re.split(r"[\s,]+", value or "") if n)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(value: str) -> int:
    """``"100MB"`` -> 100_000_000; accepts B, KB, MB, GB, KiB, MiB, GiB (or none: bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--size-warn {value!r}: give a size like 100MB, 2GB or 500000 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _parse(fn: Any, line: str) -> Any:
    """``parse_argstring`` whose errors also show the usage line."""
    try:
        return parse_argstring(fn, line)
    except UsageError as exc:
        usage = " ".join(fn.parser.format_usage().replace("::", "").split())
        raise UsageError(f"{exc}; usage: {usage}") from None


@magic_arguments(name="rtq connect")
@argument(
    "url",
    nargs="?",
    help="redis://HOST:PORT[/DB] or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE "
    "(default: RTQ_REDIS_URL, else embedded + local worker)",
)
@argument("--prefix", default="rtq", help="key prefix the workers use (default: rtq)")
@argument("--cluster", action="store_true", help="URL is a node of a Redis Cluster (workers use --cluster too)")
@argument("--queue", default=DEFAULT_QUEUE, help="queue %%%%rtq uses when given no NAME (default: default)")
@argument("--secret", help="sign payloads with this secret (default: RTQ_SECRET)")
def _connect_args(line: str) -> None:
    """%rtq connect [URL] [--prefix P] [--queue NAME] [--cluster]: connect the magics to Redis."""


@magic_arguments(name="rtq wait")
@argument("name", help="the variable holding the cell's handle (from %%%%rtq --no-wait -o NAME)")
def _wait_args(line: str) -> None:
    """%rtq wait NAME: wait for a --no-wait cell; its variables arrive and its value shows."""


@magics_class
class RtqMagics(Magics):
    """``%rtq connect|status|wait|session|pull|push`` and ``%%rtq``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session: _Session | None = None

    @property
    def ip(self) -> Any:
        """The shell these magics are registered with (always set once loaded)."""
        return self.shell

    # -- %rtq ------------------------------------------------------------------------------
    @no_var_expand
    @line_magic("rtq")  # type: ignore[arg-type]  # IPython's annotations are stricter than its use
    def rtq_line(self, line: str) -> Any:
        """%rtq connect [URL] [--prefix P] [--queue NAME] | status | wait NAME | session [close S] | pull|push S a b

        connect: connect the magics to Redis at URL (default: RTQ_REDIS_URL; else an embedded
            server and a local worker that stops with this kernel).
        status:  show workers, queues and running tasks.
        wait:    wait for a cell started with %%rtq --no-wait -o NAME; bring its variables back.
        session: list this kernel's sessions (worker, host, GPU, age, idle, the names they hold);
            session close S ends one.
        pull:    pull S a b brings names a and b from session S into the notebook.
        push:    push S a b sends notebook variables a and b into session S.

        Run a cell remotely with %%rtq [NAME] (see %%rtq?).
        """
        command, _, rest = line.strip().partition(" ")
        if command == "connect":
            return self._connect(_parse(_connect_args, rest))
        if command == "status":
            return self._status()
        if command == "wait":
            return self._wait_cmd(_parse(_wait_args, rest))
        if command in ("session", "sessions"):
            return self._session_cmd(rest.split())
        if command in ("pull", "push"):
            words = rest.split()
            if not words:
                raise UsageError(f"%rtq {command}: name the session and the variables: %rtq {command} S a b")
            sessions = self._require().sessions
            name = check_session_name(words[0], f"%rtq {command}")
            move = sessions.pull if command == "pull" else sessions.push
            return move(self.ip, name, tuple(n for w in words[1:] for n in _names(w)))
        raise UsageError(
            (f"%rtq: unknown command {command!r}" if command else "%rtq: missing command")
            + "; use %rtq connect [URL] [--prefix P], %rtq status, %rtq wait NAME, %rtq session [close S], "
            "%rtq pull S a b or %rtq push S a b (and %%rtq [NAME] [--session S] for cells)"
        )

    def _session_cmd(self, words: list[str]) -> None:
        sessions = self._require().sessions
        if not words:
            return sessions.show()
        if words[0] == "close" and len(words) == 2:
            return sessions.close(check_session_name(words[1], "%rtq session close"))
        raise UsageError("%rtq session: use %rtq session (list them) or %rtq session close S")

    def _connect(self, args: Any) -> None:
        url: str = args.url or os.environ.get("RTQ_REDIS_URL") or ""
        embedded = not url
        try:
            check_name("queue name", args.queue)
            if embedded:
                from ..server import default_server

                url = default_server().url
            if args.cluster and embedded:
                raise UsageError("%rtq connect --cluster needs the URL of a cluster node")
            queue = connect(url, args.prefix, secret=args.secret, cluster=args.cluster)
        except (RtqError, ValueError) as exc:
            raise UsageError(f"%rtq connect: {exc}") from None
        session = _Session(queue, url, args.queue)
        old, self.session = self.session, session
        if old is not None:  # reconnecting: keep a local worker that still serves this server
            if old.url == url and old.worker is not None and old.worker.poll() is None:
                session.worker, old.worker = old.worker, None
            old.close()
        where = redact_url(url)
        if embedded and not queue.is_listened(args.queue):
            proc = self._start_local_worker(session, args.prefix, args.queue)
            print(
                f"rtq: no Redis configured (no URL, RTQ_REDIS_URL unset): started an embedded server at {where} "
                f"and a local worker (pid {proc.pid}) on queue {args.queue!r}; both stop when this kernel exits."
            )
        elif embedded:
            print(
                f"rtq: connected to the embedded server at {where}; workers serve: "
                f"{', '.join(sorted(session.served_queues())) or 'none'}"
            )
        else:
            served = ", ".join(repr(q) for q in sorted(session.served_queues())) or "none yet"
            print(
                f"rtq: connected to {where} (prefix {args.prefix!r}); live workers serve {served}; "
                f"%%rtq without a NAME runs on {args.queue!r}"
            )

    def _start_local_worker(self, session: _Session, prefix: str, name: str) -> subprocess.Popen[bytes]:
        from ..local import local_worker

        try:
            worker = local_worker(session.queue, name, url=session.url, timeout=WORKER_START_TIMEOUT)
        except RtqError as exc:
            raise UsageError(f"%rtq connect: {exc}") from None
        session.worker = worker.process
        return worker.process

    def _require(self) -> _Session:
        if self.session is None:
            raise UsageError(
                "rtq is not connected: run %rtq connect redis://HOST:PORT first "
                "(or %rtq connect with no URL for an embedded server and a local worker)"
            )
        return self.session

    def _status(self) -> None:
        from ..status import format_status, gather_status

        session = self._require()
        print(
            f"connected to {redact_url(session.url)} prefix={session.queue.prefix!r}; "
            f"%%rtq default queue: {session.default!r}"
        )
        print(format_status(gather_status(session.queue)))

    def _wait_cmd(self, args: Any) -> Any:
        fut = self.ip.user_ns.get(args.name)
        if not isinstance(fut, CellFuture):
            raise UsageError(
                f"%rtq wait: {args.name!r} is not a cell handle; store one with %%rtq --no-wait -o {args.name}"
            )
        return wait_cell(fut, progress_after=WAIT_PROGRESS_AFTER, stop_on_interrupt=False, label=args.name)

    # -- %%rtq -----------------------------------------------------------------------------
    @magic_arguments(name="%rtq")
    @argument("name", nargs="?", help="queue to run on (default: the --queue of %%rtq connect)")
    @argument("--push", metavar="A,B", help="ship exactly these variables (default: the ones the cell reads)")
    @argument("--pull", metavar="C,D", help="bring back exactly these variables (default: the ones it assigns)")
    @argument("--no-wait", action="store_true", help="return a handle at once; variables arrive when you wait on it")
    @argument("-o", "--out", metavar="VAR", help="store the cell's handle (a TaskFuture) in VAR, waiting or not")
    @argument("--timeout", type=float, default=None, help="stop the cell after S seconds")
    @argument("--size-warn", default="100MB", help="warn about variables bigger than this (default 100MB)")
    @argument("--progress-after", type=float, default=2.0, help="show the progress bar after S seconds (default 2)")
    @argument("--session", metavar="S", help="run in session S, a namespace that stays on its worker between cells")
    @output_can_be_silenced
    @no_var_expand
    @cell_magic("rtq")  # type: ignore[arg-type]
    def rtq_cell(self, line: str, cell: str) -> Any:
        """Run this cell on a worker: what it reads is shipped, what it assigns comes back."""
        args = _parse(self.rtq_cell, line)
        session = self._require()
        name = args.name or session.default
        try:
            check_name("queue name", name)
        except ValueError as exc:
            raise UsageError(f"%%rtq: {exc}") from None
        if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError(f"%%rtq: --timeout must be a finite number of seconds above zero, not {args.timeout:g}")
        handle = None
        sname = check_session_name(args.session) if args.session is not None else None
        if sname is None or sname not in session.sessions.handles:
            # An open session's own check (its worker's lease) stands for this one: no round trip.
            self._check_served(session, name)
        if sname is not None:
            handle = session.sessions.for_cell(sname, name)
        spec, explicit_pull = self._spec(args, line, cell, handle)
        ex = session.executor(name, args.timeout)
        label = f"%%rtq cell In[{cell_number(self.ip)}]"
        with deferred_interrupts() as interrupt:
            try:
                if handle is None:
                    fut = ex.submit_cell(spec, label)
                else:
                    fut = ex.submit_session_cell(handle, spec, label)
            except SerializationError as exc:
                raise short_error(exc, str(exc)) from None
            except SessionLost as exc:
                raise session.sessions.lost(exc, handle.label if handle else "") from None
            fut._cell = CellContext(self.ip, spec.pull, explicit_pull, handle)
            if args.out:
                self.ip.user_ns[args.out] = fut
        if args.no_wait and not interrupt.hit:
            if not args.out:
                return fut  # displayed as the cell's result; its repr says how to wait on it
            print(
                f"rtq: cell running on {name!r} as task {fut.task_id}; "
                f"%rtq wait {args.out} or {args.out}.result() brings its variables back"
            )
            return None
        try:
            return wait_cell(fut, progress_after=args.progress_after, stop_on_interrupt=True, interrupted=interrupt.hit)
        except SessionLost as exc:
            if handle is None:
                raise
            raise session.sessions.lost(exc, handle.label) from None

    def _check_served(self, session: _Session, name: str) -> None:
        if session.queue.is_listened(name):
            return
        served = session.served_queues()
        if name in served:
            return
        known = ", ".join(sorted(served)) or "none"
        raise UsageError(
            f"%%rtq: no worker listens on queue {name!r} (live workers serve: {known}); start one with "
            f"`rtq worker {name} --url {redact_url(session.url)} --prefix {session.queue.prefix}`"
        )

    def _spec(self, args: Any, line: str, cell: str, session: SessionHandle | None = None) -> tuple[CellSpec, bool]:
        """The cell to ship, and whether ``--pull`` named what comes back.

        In a ``session`` the names it holds are not shipped, and only ``--pull``-ed names come back.
        """
        shell = self.ip
        text_ = f"%%rtq {line}".rstrip() + "\n" + cell
        number = cell_number(shell)
        compiler = getattr(shell, "compile", None)
        if compiler is not None and hasattr(compiler, "cache"):
            # Registered as a cell of that number: tracebacks read "Cell In[n]", as IPython's own.
            filename = compiler.cache(text_, number, raw_code=text_)
        else:
            filename = f"<rtq-cell-{number}>"
        # A SyntaxError propagates as is: IPython shows it with the cell's line and a caret.
        analysis = analyze(cell, filename, first_line=2)
        ns = shell.user_ns
        hidden = getattr(shell, "user_ns_hidden", {})
        if args.push is not None:
            push = _names(args.push)
            missing = [n for n in push if n not in ns]
            if missing:
                raise UsageError(f"%%rtq --push: not defined in the notebook: {', '.join(missing)}")
        else:
            held = {str(n[0]) for n in session.held} if session is not None else set()
            push = tuple(
                n for n in analysis.reads if n in ns and n not in held and not (n in hidden and hidden[n] is ns[n])
            )
        values = ShippedValues()  # pickled here once: measured, checked, and shipped as is
        modules: dict[str, str] = {}
        threshold = parse_size(args.size_warn)
        ship_local_modules()  # code from local modules goes by value, as the executor's submit does
        for n in push:
            value = ns[n]
            if isinstance(value, (types.ModuleType, RemoteModule)) and not _by_value(value):
                modules[n] = value.__name__
                continue
            try:
                size = values.add(n, value)
            except Exception as exc:
                err = SerializationError(describe_unpicklable(value, f"variable {n!r}", exc))
                raise short_error(err, str(err)) from None
            if size > threshold:
                print(
                    f"rtq: variable {n!r} is {_size_text(size)} pickled, over --size-warn {args.size_warn}; "
                    "shipping it anyway (pass --push to choose what goes)",
                    file=sys.stderr,
                )
        explicit_pull = args.pull is not None
        pull = _names(args.pull) if explicit_pull else () if session is not None else analysis.assigns
        display = analysis.last_expr and not DisplayHook.semicolon_at_end_of_expression(cell)
        spec = CellSpec(
            source=cell,
            text=text_,
            filename=filename,
            first_line=2,
            values=values,
            modules=modules,
            pull=tuple(pull),
            display=display,
            cpu=not notebook_has_cuda(),
            replace=args.push is not None,
        )
        if session is not None:  # until it ends (a --no-wait cell), count what it assigns as held
            known = {str(n[0]) for n in session.held}
            session.held = session.held + [[n, "?", 0] for n in analysis.assigns if n not in known]
        return spec, explicit_pull


def cell_number(shell: Any) -> int:
    """The number IPython shows for the cell running now (``In[n]``), as its own tracebacks do.

    IPython 9 counts a cell before running it (its ``execution_count`` is already the next
    cell's while one runs), IPython 8 after it ran; on both, the execution result IPython hands
    its display hook while a cell runs holds that cell's number.
    """
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    number = getattr(running, "execution_count", None)
    return number if isinstance(number, int) else int(shell.execution_count)


def _by_value(module: Any) -> bool:
    """Whether a module is local code that cloudpickle ships by value (not importable remotely)."""
    return isinstance(module, types.ModuleType) and module.__name__ in ship_local_modules()


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(RtqMagics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("RtqMagics")
    if magics is not None and magics.session is not None:
        magics.session.close("closed: %unload_ext rtq in its notebook")
        magics.session = None
