"""Sessions and actors on the worker: state that lives in this process, and the calls made to it.

One mechanism serves both: a :class:`Session` is a piece of state (a ``%%rtq --session``
namespace, or an actor's instance) pinned to this worker process. It is opened by an ordinary
task (:func:`open_session`, claimed from the queue like any other), which builds the state here
and starts the session's own thread. From then on the calls aimed at it are queued on the
session's call list (``session-queue|<worker>|<sid>``), which only this process serves: the
session's thread takes them one at a time, in the order they were queued, and runs each like
any task (output, progress, cancellation and deadlines included) with :func:`current_session`
naming the state. That thread is the slot the session holds while it exists; a worker holds at
most ``limit`` sessions (``rtq worker --sessions``) and refuses more with
:class:`~rtq.errors.SessionRefused`.

A session ends when it is closed (a close call, queued behind the calls before it), when it was
idle longer than ``idle`` seconds (``--session-idle``), or when the worker stops (after the
running calls had their grace). Its record then says ``closed`` and why, and every call still
queued to it fails with :class:`~rtq.errors.SessionLost` — so does every later call (the
client checks the record). A worker that dies takes its sessions with it; the caller learns
it from the lapsed lease (:mod:`rtq.sessions`), and the calls it held are failed, never
requeued (:mod:`rtq.worker.recovery`): a call runs against a session's state at most once.
"""

from __future__ import annotations

import builtins
import contextvars
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..backend.connections import RedisError
from ..backend.sessions import SessionRecords
from ..backend.wire import Channel
from ..errors import RtqError, SessionLost, SessionRefused
from ..task import current_task
from .claiming import Lane
from .held import HeldResults, is_large

if TYPE_CHECKING:
    from ..backend.store import TaskStore
    from .run import Run
    from .state import WorkerState

__all__ = [
    "DEFAULT_IDLE",
    "DEFAULT_LIMIT",
    "Session",
    "SessionHost",
    "call_method",
    "close_session",
    "current_session",
    "fetch_result",
    "held_names",
    "open_session",
    "size_of",
]

logger = logging.getLogger("rtq.worker")

DEFAULT_LIMIT = 4
"""Sessions one worker process holds at most (``rtq worker --sessions``): sized for one GPU."""
DEFAULT_IDLE = 7200.0
"""Seconds a session may go unused before it is closed (``--session-idle``): a laptop that
sleeps over lunch keeps its model."""
WAIT_S = 1.0
"""Longest one blocking wait of a session's thread (and of the opener) before it checks for a stop:
a stopping worker must not wait out the queue's ``interval`` once per session."""
NAMES_SHOWN = 200
"""Most held names a session's record lists (with their types and sizes)."""


class _Runs(Protocol):
    """What a session needs from the listener it lives in."""

    event: threading.Event
    interval: float
    state: WorkerState

    def claim_from(
        self, channel: Channel, key: str, queue: str, wait: float, *, stopping: bool = False
    ) -> Run | None: ...

    def lane(self) -> Lane: ...

    def release(self, lane: Lane) -> None: ...

    def take_from(self, lane: Lane, key: str, queue: str, wait: float) -> Run | None: ...

    def execute(self, run: Run) -> None: ...

    def refuse(self, run: Run, exc: BaseException) -> None: ...

    def announce(self) -> None: ...


@dataclass(eq=False)
class Session:
    """One session (or actor) living in this process.

    Attributes:
        id: Its id (the client made it: unique).
        kind: ``'cell'`` (a namespace for ``%%rtq --session``) or ``'actor'`` (an instance).
        label: What its owner calls it (the session name, or the actor's class).
        queue: The queue it was opened from (its calls are labelled with it).
        state: The namespace (``kind='cell'``) or the instance (``kind='actor'``).
        created: When it was opened (Unix seconds).
        used: When its last call ended (monotonic seconds).
        calls: How many calls it ran.
        closing: Why it is to close once the running call ends ('' while open).
        results: The large results of its calls it holds until their callers ask (actors).
    """

    id: str
    kind: str
    label: str
    queue: str
    state: Any = None
    created: float = field(default_factory=time.time)
    used: float = field(default_factory=time.monotonic)
    calls: int = 0
    closing: str = ""
    thread: threading.Thread | None = None
    results: HeldResults = field(default_factory=HeldResults)

    @property
    def namespace(self) -> dict[str, Any]:
        """The namespace of a ``%%rtq --session`` session."""
        if not isinstance(self.state, dict):
            raise RtqError(f"session {self.label!r} is an actor, not a cell namespace")
        return self.state


_current_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar("rtq_session", default=None)
_current_host: contextvars.ContextVar[SessionHost | None] = contextvars.ContextVar("rtq_session_host", default=None)


def current_session() -> Session:
    """The session the running call is aimed at.

    Raises:
        RtqError: Not inside a call to a session (the function was run some other way).
    """
    session = _current_session.get()
    if session is None:
        raise RtqError("this function runs only as a call to an rtq session or actor, on its worker")
    return session


class SessionHost:
    """The sessions of one worker process: opening, serving, closing, the limit and the idle expiry.

    Args:
        listener: The listener it lives in (claims and runs the calls).
        store: The namespace's task records.
        limit: Most sessions held at once.
        idle: Seconds a session may go unused before it closes.
    """

    def __init__(self, listener: _Runs, store: TaskStore, *, limit: int, idle: float) -> None:
        if limit < 0:
            raise ValueError(f"sessions must be at least 0, not {limit!r}")
        if not idle > 0:
            raise ValueError(f"session_idle must be above zero seconds, not {idle!r}")
        self.listener = listener
        self.store = store
        self.records = SessionRecords(store)
        self.limit = limit
        self.idle = idle
        self.worker_id = listener.state.id
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._opening = 0

    @property
    def ttl(self) -> float:
        """Seconds an open session's record lives unless touched: past its idle expiry."""
        return self.idle + 3 * self.listener.state.lease + 60.0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @contextmanager
    def hosting(self, session: Session | None) -> Iterator[None]:
        """While a task runs: :func:`open_session` finds this host, :func:`current_session` its session."""
        token = _current_host.set(self)
        aimed = _current_session.set(session)
        try:
            yield
        finally:
            _current_session.reset(aimed)
            _current_host.reset(token)

    # -- opening ---------------------------------------------------------------------------
    def open(self, session_id: str, kind: str, label: str, queue: str, build: Callable[[], Any]) -> dict[str, Any]:
        """Open a session: reserve one of the ``limit`` places, ``build()`` its state, serve its calls.

        Returns where it lives (worker id, host, pid, GPUs), for the caller to aim calls at it.

        Raises:
            SessionRefused: This worker holds ``limit`` sessions already, or is stopping.
            Exception: Whatever ``build()`` raised (an actor's ``__init__``); nothing stays open.
        """
        with self._lock:
            if self.listener.event.is_set():
                raise SessionRefused(f"worker {self.worker_id} on {self.host} is stopping: it opens no sessions")
            if len(self._sessions) + self._opening >= self.limit:
                held = ", ".join(repr(s.label) for s in self._sessions.values()) or "none yet"
                raise SessionRefused(
                    f"worker {self.worker_id} on {self.host} holds {self.limit} session(s), its --sessions limit "
                    f"(open: {held}); close one (%rtq session close NAME, actor.close()) or start a worker with "
                    "more (rtq worker --sessions N)"
                )
            self._opening += 1
        try:
            session = Session(session_id, kind, label, queue)
            session.state = build()
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            where = {"worker": self.worker_id, "host": self.host, "pid": os.getpid(), "gpu": gpu}
            self.records.open(
                session_id,
                {
                    **where,
                    "kind": kind,
                    "label": label,
                    "queue": queue,
                    "created": session.created,
                    "used": time.time(),
                    "calls": 0,
                    "names": held_names(session),
                    "idle_limit": self.idle,
                },
                self.ttl,
            )
            with self._lock:
                self._sessions[session_id] = session
                self._announce()
            self._beat()
        finally:
            with self._lock:
                self._opening -= 1
        session.thread = threading.Thread(target=self._serve, args=(session,), name=f"rtq-session-{label}", daemon=True)
        session.thread.start()
        logger.info("opened session %s (%s %r)", session_id, kind, label)
        return where

    def _announce(self) -> None:
        """The sessions this worker holds, in its heartbeat record (callers choose the worker with room)."""
        self.listener.state.info["sessions"] = [
            {"id": s.id, "kind": s.kind, "label": s.label} for s in self._sessions.values()
        ]

    def start(self) -> None:
        """Serve this process's own queue of sessions to open (callers choose the worker)."""
        if self.limit:
            self._opener = threading.Thread(target=self._serve_opens, name="rtq-session-opens", daemon=True)
            self._opener.start()

    def _serve_opens(self) -> None:
        """Open the sessions queued to this process, one at a time (a model loads onto the GPU in turn)."""
        listener = self.listener
        key = self.store.keys.session_opens(self.worker_id)
        lane = listener.lane()
        wait = max(0.05, min(listener.interval, self.store.cap, WAIT_S))
        try:
            while not listener.event.is_set():
                try:
                    run = listener.take_from(lane, key, "", wait)
                except RedisError as exc:
                    logger.warning("cannot take sessions to open (%s); retrying", exc)
                    listener.event.wait(min(1.0, wait))
                    continue
                if run is not None:
                    listener.execute(run)
        except BaseException:  # never silently: its callers would wait for their deadlines
            logger.exception("the opening of sessions stopped")
        finally:
            listener.release(lane)

    # -- serving ---------------------------------------------------------------------------
    def _serve(self, session: Session) -> None:
        """The session's thread: its calls one at a time, in order, until it closes."""
        listener = self.listener
        key = self.store.keys.session_queue(self.worker_id, session.id)
        lane = listener.lane()
        wait = max(0.05, min(listener.interval, self.store.cap, WAIT_S, self.idle / 4))
        try:
            while not listener.event.is_set() and not session.closing:
                if time.monotonic() - session.used > self.idle:
                    session.closing = (
                        f"idle expiry: unused for more than {self.idle:g} s, the --session-idle of its worker "
                        f"{self.worker_id} on {self.host}"
                    )
                    break
                try:
                    run = listener.take_from(lane, key, session.queue, wait)
                except RedisError as exc:
                    logger.warning("cannot take calls of session %s (%s); retrying", session.id, exc)
                    listener.event.wait(min(1.0, wait))
                    continue
                if session.results.expire(time.time()):
                    self._touch(session)
                if run is None:
                    continue
                run.session = session
                # Its record says what it holds before the caller wakes (%rtq session, the next cell).
                run.ran = lambda: self._ran(session)
                listener.execute(run)
        except BaseException:  # never silently: its callers would wait for their deadlines
            logger.exception("session %s stopped serving", session.id)
            failed = f"worker error: the session's thread in {self.worker_id} on {self.host} failed"
            session.closing = session.closing or failed
        finally:
            listener.release(lane)
        if session.closing:
            self._end(session, session.closing)

    def _beat(self) -> None:
        """Announce the sessions held now, so the next caller choosing a worker sees them."""
        try:
            self.listener.announce()
        except RedisError as exc:
            logger.debug("could not announce the sessions held (%s)", exc)

    def _ran(self, session: Session) -> None:
        session.used = time.monotonic()
        session.calls += 1
        self._touch(session)

    def _touch(self, session: Session) -> None:
        try:
            self.records.touch(
                session.id,
                {
                    "used": time.time(),
                    "calls": session.calls,
                    "names": held_names(session),
                    "results": session.results.listing(),
                },
                self.ttl,
            )
        except RedisError as exc:
            logger.warning("could not update the record of session %s (%s)", session.id, exc)

    # -- closing ---------------------------------------------------------------------------
    def close_all(self, reason: str) -> None:
        """End every session (the worker stops): once their threads left, fail what is queued to them."""
        opener = getattr(self, "_opener", None)
        if opener is not None:
            opener.join(5 * WAIT_S)
        self._refuse_all(
            self.store.keys.session_opens(self.worker_id),
            SessionRefused(f"worker stopped: its worker {self.worker_id} on {self.host} shut down before opening it"),
        )
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.closing = session.closing or reason
            if session.thread is not None and session.thread is not threading.current_thread():
                session.thread.join(5 * WAIT_S)
            self._end(session, session.closing)

    def _end(self, session: Session, reason: str) -> None:
        """Close ``session``: its record says why, its queued calls fail, its state is dropped."""
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                return  # ended already (its thread and close_all both got here)
            self._announce()
        self._beat()
        logger.info("closed session %s (%r): %s", session.id, session.label, reason)
        error = SessionLost(f"session {session.label!r} is lost ({reason})")
        try:
            self.records.close(session.id, reason)
            self._fail_queued(session, error)
        except RedisError as exc:  # its callers learn it from the record, or from the lapsed lease
            logger.warning("could not close session %s in Redis (%s)", session.id, exc)
        session.results.clear()
        state, session.state = session.state, None
        if isinstance(state, dict):
            state.clear()  # the namespace may be shared with closures it made: free what it held
        del state
        _free_memory()

    def _fail_queued(self, session: Session, error: SessionLost) -> None:
        """Fail every call still queued to ``session``: nothing waits for its deadline."""
        self._refuse_all(self.store.keys.session_queue(self.worker_id, session.id), error)

    def _refuse_all(self, key: str, error: RtqError) -> None:
        """Fail every call queued on ``key`` with ``error``, then drop the list."""
        channel = Channel(self.store.redis)
        try:
            while (run := self.listener.claim_from(channel, key, "", 0.0, stopping=True)) is not None:
                self.listener.refuse(run, type(error)(str(error)))
        finally:
            channel.close()
        self.records.drop_list(key)


def _free_memory() -> None:
    """Give a closed session's memory back, GPU memory included (torch caches what it freed)."""
    gc.collect()
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context must not stop the worker closing a session
        logger.debug("could not empty the CUDA cache", exc_info=True)


# -- the functions calls to sessions run (shipped by reference: the worker has rtq) ----------------
def open_session(
    session_id: str, kind: str, label: str, factory: Any = None, args: Any = (), kwargs: Any = None
) -> Any:
    """The task that opens a session: builds its state here (an actor's ``factory(*args, **kwargs)``).

    Returns where the session lives (a dict: worker, host, pid, gpu).
    """
    host = _current_host.get()
    task = current_task()
    if host is None or task is None:
        raise RtqError("sessions and actors need an rtq worker (rtq worker NAME): this task ran elsewhere")
    if kind == "actor":
        if not callable(factory):
            raise TypeError(f"an actor needs a class to build, not {type(factory).__name__}")
        build: Callable[[], Any] = lambda: factory(*args, **(kwargs or {}))  # noqa: E731
    elif kind == "cell":
        build = lambda: {"__name__": "__main__", "__builtins__": builtins}  # noqa: E731
    else:
        raise ValueError(f"unknown session kind {kind!r}")
    return host.open(session_id, kind, label, task.name, build)


def call_method(method: str, args: tuple[Any, ...], kwargs: dict[str, Any], drop: tuple[str, ...] = ()) -> Any:
    """An actor's method call: ``getattr(instance, method)(*args, **kwargs)`` on the session's instance.

    A large value stays here (:mod:`rtq.worker.held`): the call returns a :class:`~rtq.worker.held.HeldResult`
    naming it, which its caller's ``result()`` fetches. ``drop``: held values whose futures are gone.
    """
    session = current_session()
    session.results.drop(drop)
    value = getattr(session.state, method)(*args, **kwargs)
    task = current_task()
    if task is None or not is_large(value):
        return value
    return session.results.hold(task.id, value, _type_name(value), size_of(value), task.expiry)


def fetch_result(task_id: str, drop: tuple[str, ...] = ()) -> Any:
    """The call that fetches the large value call ``task_id`` left held, freeing it here.

    Raises:
        ResultFreed: It is not held any more (fetched already, or expired).
    """
    session = current_session()
    session.results.drop(drop)
    return session.results.take(task_id, session.label)


def close_session(reason: str) -> None:
    """The call that closes a session, queued behind the calls made before it."""
    current_session().closing = reason


# -- what a session holds ------------------------------------------------------------------------
def held_names(session: Session) -> list[list[Any]]:
    """``[name, type, bytes]`` of what a session holds (a namespace's names, an actor's attributes)."""
    state = session.state
    items = state.items() if isinstance(state, dict) else getattr(state, "__dict__", {}).items()
    out: list[list[Any]] = []
    for name, value in items:
        if name.startswith("__") or isinstance(value, type(sys)):
            continue
        out.append([name, _type_name(value), size_of(value)])
        if len(out) >= NAMES_SHOWN:
            break
    return out


def size_of(value: Any) -> int:
    """About how many bytes ``value`` holds: an array's or tensor's data, a model's weights, else its own size."""
    try:
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            return nbytes
        if isinstance(value, (bytes, bytearray, str)):
            return len(value)
        if isinstance(value, memoryview):
            return value.nbytes
        parameters = getattr(value, "parameters", None)
        if "torch" in sys.modules and callable(parameters) and isinstance(value, sys.modules["torch"].nn.Module):
            return sum(p.nelement() * p.element_size() for p in parameters())
        return sys.getsizeof(value)
    except Exception:  # a hostile property must not break the listing
        return 0


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
