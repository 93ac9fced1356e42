"""Sessions and actors from the caller's side: state that stays in one worker process.

``rtq.Executor.actor(cls, *args)`` builds ``cls(*args)`` in one worker process serving the
executor's queue and returns an :class:`Actor`; ``actor.method(...)`` queues a call to that
process alone and returns a :class:`~rtq.executor.TaskFuture`. ``%%rtq --session S`` cells use
the same :class:`SessionHandle` with a namespace for state. Calls to one session run one at a
time, in the order they were made (the worker's side is :mod:`rtq.worker.sessions`).

A session is never re-created behind its owner's back: once its worker died or stopped, or it
was closed or expired idle, every call raises :class:`~rtq.errors.SessionLost`, which names the
worker, its host and why. A call that was running when its worker died is never run again
elsewhere (at most once; see docs/reliability.md).
"""

from __future__ import annotations

import concurrent.futures
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

from .backend.connections import TRANSIENT, connection_error
from .backend.sessions import CLOSED, SessionRecords, SessionState, died_reason
from .calls import Call, call_label
from .collector import Pin
from .errors import SessionLost, SessionRefused
from .worker.held import HeldResult
from .worker.sessions import call_method, close_session, fetch_result, open_session

if TYPE_CHECKING:
    from .executor import Executor, TaskFuture

__all__ = ["Actor", "SessionHandle"]

CLOSE_TIMEOUT = 30.0
"""Seconds ``close()`` waits for the calls queued before it and the close itself."""
TRUST_S = 1.0
"""Seconds after a call's outcome came back during which the next call skips the session check.

The check only makes a lost session fail before its call is queued; the collector's check of
pinned calls (every :data:`~rtq.collector.CHECK_PERIOD` s) fails a call queued to a lost session
just as surely, within the lease, and cancels it. A session that just answered was not idle, and
its owner's own close is known here, so a cell run right after the last skips a round trip.
"""


class SessionHandle:
    """One session or actor as its owner sees it: where it lives, and the calls aimed at it.

    Made by :meth:`open`. Attributes ``worker``, ``host``, ``pid`` and ``gpu`` say where it lives.

    Args:
        executor: The executor whose queue it was opened from (its calls go through it).
        kind: ``'actor'`` or ``'cell'``.
        label: What its owner calls it (shown in errors, bars and ``%rtq session``).
    """

    def __init__(self, executor: Executor, kind: str, label: str) -> None:
        self.executor = executor
        self.kind = kind
        self.label = label
        self.id = uuid.uuid4().hex
        self.where: dict[str, Any] = {}
        self.opened = 0.0
        self.records = SessionRecords(executor.queue.store)
        self.lost: SessionLost | None = None
        self.held: list[list[Any]] = []  # [name, type, bytes] of what it holds, as its last call said
        self._drops: list[str] = []  # calls whose held results nobody can ask for any more
        self._answered = -TRUST_S  # when (monotonic) a call's outcome last came back from its worker

    @classmethod
    def open(
        cls,
        executor: Executor,
        kind: str,
        label: str,
        factory: Any = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> SessionHandle:
        """Open a session on one of the workers serving ``executor``'s queue and wait until it lives.

        A worker that refuses it (another caller took its last place first, or it is stopping)
        is passed over for the next one with room, as its heartbeat says.

        Raises:
            rtq.errors.SessionRefused: No worker serving the queue has room (each refusal is listed).
            Exception: Whatever building the state raised (an actor's ``__init__``), as its own type.
        """
        handle = cls(executor, kind, label)
        end = time.monotonic() + (executor.timeout if timeout is None else timeout)
        call = Call(open_session, (handle.id, kind, label, factory, args, kwargs or {}), label=f"open {label}"[:40])
        refused: dict[str, str] = {}  # worker id -> why it refused
        while True:
            handle.where = {"worker": handle._choose_worker(refused)}
            pin = Pin(handle.worker, handle.id, executor.queue.keys.session_opens(handle.worker), handle.error, True)
            fut = executor._submit_calls([call], pin=pin, extra={"session": handle.id})[0]
            try:
                where = fut.result(max(0.0, end - time.monotonic()))
            except SessionRefused as exc:  # it built nothing: another worker may have room
                refused[handle.worker] = str(exc)
                continue
            handle.where = dict(where)
            handle.opened = time.time()
            return handle

    def _choose_worker(self, refused: dict[str, str] | None = None) -> str:
        """The live worker serving the queue with the most room for sessions (fewest held).

        Args:
            refused: Workers that refused this session already (passed over), with why.

        Raises:
            rtq.errors.SessionRefused: None serves the queue, or each holds its ``--sessions`` limit
                or refused it.
        """
        name = self.executor.name
        refused = refused or {}
        serving = [
            r
            for r in self.executor.queue.live_workers()
            if name in r.get("queues", []) and not r.get("stopping") and r.get("id") not in refused
        ]
        if not serving and refused:
            raise SessionRefused(
                f"no worker serving {name!r} has room for another session: {'; '.join(refused.values())}"
            )
        if not serving:
            raise SessionRefused(
                f"no live worker serves queue {name!r}: start one with `rtq worker {name}` to open a session there"
            )
        room = [r for r in serving if len(r.get("sessions", [])) < int(r.get("session_limit", 0))]
        if not room:
            full = ", ".join(
                f"{r.get('id')} ({len(r.get('sessions', []))}/{r.get('session_limit', 0)})" for r in serving
            )
            raise SessionRefused(
                f"every worker serving {name!r} holds its --sessions limit: {full}; close a session or actor "
                "(%rtq session close NAME, actor.close()), or start a worker with more (rtq worker --sessions N)"
            )
        least = min(len(r.get("sessions", [])) for r in room)
        return str(random.choice([r for r in room if len(r.get("sessions", [])) == least])["id"])

    @property
    def worker(self) -> str:
        return str(self.where.get("worker", ""))

    @property
    def host(self) -> str:
        return str(self.where.get("host", ""))

    @property
    def key(self) -> str:
        """The list its calls are queued on (served by its worker process alone)."""
        return self.executor.queue.keys.session_queue(self.worker, self.id)

    def __repr__(self) -> str:
        state = "lost" if self.lost else "open"
        return f"<rtq session {self.label!r} ({self.kind}) on worker {self.worker} ({self.host}), {state}>"

    # -- state -----------------------------------------------------------------------------
    def state(self) -> SessionState:
        """Its record and whether its worker's lease holds, as Redis says now (one round trip)."""
        try:
            return self.records.state(self.id, self.worker)
        except TRANSIENT as exc:
            raise connection_error(exc, self.executor.queue.store.redis) from exc

    def check(self) -> SessionState:
        """Raise :class:`SessionLost` unless the session is open and its worker alive; its state."""
        if self.lost is not None:
            raise SessionLost(str(self.lost))
        now = self.state()
        reason = self.reason_lost(now)
        if reason:
            self.lost = self.error(reason)
            raise SessionLost(str(self.lost))
        return now

    def reason_lost(self, now: SessionState) -> str:
        """Why the session is lost as ``now`` shows it ('' while it lives); marks its record when its worker died."""
        if now.state == CLOSED:
            return now.reason or "closed"
        if not now.record:
            return (
                f"its record is gone: its worker {self.worker} on {self.host} ended long ago, or Redis lost it "
                "(restart, eviction or flush)"
            )
        if not now.alive:
            reason = died_reason(self.worker, self.host)
            try:
                self.records.close(self.id, reason, only_if_open=True)
            except TRANSIENT:  # the caller learns it all the same
                pass
            return reason
        return ""

    def error(self, reason: str) -> SessionLost:
        what = "actor" if self.kind == "actor" else "session"
        return SessionLost(f"{what} {self.label!r} is lost ({reason}); it is not re-created: open a new one")

    def pin(self) -> Pin:
        """What the collector watches for the calls to this session (worker, record, how to say it is lost)."""
        return Pin(self.worker, self.id, self.key, self._lost_by_collector)

    def _lost_by_collector(self, reason: str) -> BaseException:
        self.lost = self.lost or self.error(reason)
        return SessionLost(str(self.lost))

    # -- calls -----------------------------------------------------------------------------
    def submit(self, call: Call, *, executor: Executor | None = None) -> TaskFuture:
        """Queue ``call`` to this session's worker process alone; its future at once.

        Args:
            call: What to run there.
            executor: Submit through this one (its timeout, its kind of future); default: the
                executor the session was opened from.

        The session is checked first (one round trip), unless a call's outcome came back from
        its worker within :data:`TRUST_S` seconds (cells run one after another skip it).

        Raises:
            rtq.errors.SessionLost: The session is closed, expired, or its worker is gone.
        """
        if self.lost is not None:
            raise SessionLost(str(self.lost))
        if time.monotonic() - self._answered >= TRUST_S:
            self.check()
        ex = executor or self.executor
        fut = ex._submit_calls([call], pin=self.pin(), extra={"session": self.id})[0]
        fut._session = self
        fut.add_done_callback(self._ended)
        return fut

    def _ended(self, fut: concurrent.futures.Future[Any]) -> None:
        """A call's outcome came back: its worker served the session just now, or said it is lost."""
        if fut.cancelled():
            return
        exc = fut.exception(0)
        if isinstance(exc, SessionLost):
            self.lost = self.lost or exc  # every later call raises at once
        else:
            self._answered = time.monotonic()

    # -- large results held on the worker (rtq.worker.held) ------------------------------------------
    def fetch(self, held: HeldResult) -> TaskFuture:
        """Queue the call that brings the value ``held`` names home; its future.

        Raises:
            rtq.errors.SessionLost: The session (and the value it held) is gone.
        """
        return self.submit(Call(fetch_result, (held.task_id, self.drops()), label=f"fetch {self.label}"[:40]))

    def forget(self, task_id: str) -> None:
        """The future of call ``task_id`` is gone: its held value goes with the next call (GC-safe: no I/O)."""
        self._drops.append(task_id)

    def drops(self) -> tuple[str, ...]:
        """The held values to free, taken: each goes with one call."""
        taken = []
        while self._drops:
            try:
                taken.append(self._drops.pop())
            except IndexError:  # emptied by another thread meanwhile
                break
        return tuple(taken)

    def close(self, *, wait: bool = True, reason: str = "closed: by its owner") -> None:
        """Close it after the calls queued before (``wait``: until it is closed). Closing a lost one does nothing."""
        if self.lost is not None:
            return
        try:
            fut = self.submit(Call(close_session, (reason,), label=f"close {self.label}"[:40]))
        except SessionLost:
            return
        self.lost = self.error(reason)
        if wait:
            fut.result(CLOSE_TIMEOUT)


class Actor:
    """An instance of a class living in one worker process: ``actor.method(...)`` returns a future.

    Made by :meth:`rtq.Executor.actor`. Calls run there one at a time, in the order they were
    made; a method that raises leaves the actor as it was and its future raises the exception.
    A method's large value (1 MiB or more pickled) stays on the worker until its future's
    ``result()`` asks for it (:mod:`rtq.worker.held`).
    ``close()`` (or leaving a ``with`` block) frees it. Once it is lost — closed, idle too long,
    or its worker stopped or died — every call raises :class:`~rtq.errors.SessionLost`.

    Attributes:
        cls: The class it is an instance of.
        session: Its :class:`SessionHandle` (``worker``, ``host``, ``id``).
    """

    def __init__(self, session: SessionHandle, cls: type) -> None:
        self.session = session
        self.cls = cls

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self.cls, name, None)
        if not callable(attr):
            methods = sorted(n for n in dir(self.cls) if not n.startswith("_") and callable(getattr(self.cls, n, None)))
            raise AttributeError(
                f"actor {self.cls.__qualname__} has no method {name!r}; its methods: {', '.join(methods) or 'none'}"
            )
        return _Method(self, name)

    def close(self) -> None:
        """Free the instance once the calls made before have run; later calls raise ``SessionLost``."""
        self.session.close(reason="closed: actor.close() by its owner")

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "lost" if self.session.lost else "live"
        return f"<rtq.Actor {self.cls.__qualname__} on worker {self.session.worker} ({self.session.host}), {state}>"


class _Method:
    """One method of an actor: calling it queues the call and returns its future."""

    def __init__(self, actor: Actor, name: str) -> None:
        self.actor = actor
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> TaskFuture:
        fn = getattr(self.actor.cls, self.name)
        session = self.actor.session
        call = Call(call_method, (self.name, args, kwargs, session.drops()), label=call_label(fn, args, kwargs))
        return session.submit(call)

    def __repr__(self) -> str:
        return f"<method {self.actor.cls.__qualname__}.{self.name} of {self.actor!r}>"
