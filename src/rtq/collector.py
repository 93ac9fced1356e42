"""The client's one wait path: a single blocking read wakes every caller whose task ended.

Every task submitted through one :class:`~rtq.task_queue.RedisTaskQueue` object — by
``query()``, ``execute_task_remotely()`` or any ``rtq.Executor`` on it — announces its end by
pushing its id on that queue object's *inbox* (``<p>|<s>|inbox:<client>``). One collector at a
time blocks on the inbox, reads the outcomes of the ids it pops in the same round trip, and
hands each to its waiter: a blocked ``query()`` thread or a ``TaskFuture``. So a thousand
threads waiting in ``query()`` on one client hold one connection between them, not a thousand
(redis-py's pool would refuse the 101st), and nobody polls.

Who collects (leader and followers): a thread blocked in ``query()`` or in a future's
``result()`` collects itself while nobody else does — a lone call's outcome rides along its own
wake-up, with no hand-off between threads — and, once settled, wakes another blocked caller to
take over. Futures nobody blocks on are served by a collector thread that runs while any is
pending (a future sent ahead summons it only once Redis answered the submit: by then a
``result()`` called right after ``submit()`` collects, and the thread stays asleep).

A consumed task's clean-up (its record, done list and events) rides the next wake-up's write
rather than costing a round trip of its own after the outcome is handed over; when no wake-up
follows within :data:`CHECK_PERIOD`, the collector thread runs it. Big frames go at once.

A waiter is settled only by its task's *final* state read from the record: an id that arrives
in the inbox while the record still says queued or running (a stray push) changes nothing.

What the collector checks besides, at least every :data:`CHECK_PERIOD` seconds even while the
inbox is busy:

* deadlines: a waiter whose task ran past its timeout gets :class:`~rtq.errors.TaskTimeout`
  (and its task is cancelled);
* vanished records: :class:`~rtq.errors.TaskLost` at once;
* ended tasks whose push was lost (a Redis restart): settled from the record;
* lapsed workers: their tasks are given back (:class:`~rtq.worker.recovery.Reaper`);
* calls to sessions (pinned to one worker process): one whose session closed or whose worker
  died ends with :class:`~rtq.errors.SessionLost` within a check, never at its deadline;
* tasks that are in no list: a record that says queued while its id is in neither its queue nor
  any worker's in-progress list — or running on a lapsed worker whose list lacks it — can never
  be served (an eviction under ``maxmemory`` took the entry). Seen so twice, at least
  :data:`LOST_AFTER` seconds apart, in one atomic snapshot each time, it is
  :class:`~rtq.errors.TaskLost` — not a wait until the deadline.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .backend.connections import TRANSIENT
from .backend.inbox import End, Inbox
from .backend.sessions import CLOSED, OPEN, SessionRecords, died_reason
from .backend.wire import Channel, pid
from .backoff import Backoff
from .errors import TaskLost, TaskTimeout
from .task import FINAL_STATES, TaskState

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["CHECK_PERIOD", "ERROR", "LOST_AFTER", "Blocking", "Collector", "Ended", "Pin", "Wait"]

logger = logging.getLogger("rtq.client")

CHECK_PERIOD = 1.0
"""Most seconds between two checks of the waiters' deadlines and records, busy inbox or not."""
LOST_AFTER = 1.0
"""Seconds a task must stay in no list, seen twice, before its waiter gets ``TaskLost``."""
LOCATE_EVERY = 5.0
"""Longest gap between two looks for a long-queued task's id in its queue (an O(queue) scan)."""
MAX_DONE_LISTS = 256
"""Most done lists of tasks announced elsewhere one wake-up blocks on (the rest are checked)."""
ERROR = "error"
"""How a wait ends when no outcome can be had (deadline, record or queue entry lost, unreadable)."""
IDLE_EXIT = 30.0
"""Seconds the collector thread lingers with nothing to wait for before it ends."""
EVENTS_KEEP_S = 10.0
"""Seconds a consumed task's events (its output and progress) stay readable for late watchers."""
CONSUME_BACKLOG = 1000
"""Most consumed tasks whose clean-up waits for the next wake-up; past it, it runs at once."""


@dataclass(frozen=True)
class Ended:
    """How a waited-on task ended, as handed to its waiter.

    Attributes:
        state: ``done``, ``failed`` or ``cancelled``; :data:`ERROR` when it could not be read
            (the exception is ``value``: ``TaskLost``, ``TaskTimeout``, ``SignatureError``…).
        value: The result when done, the exception when failed or ``error``.
        attempts: How many workers claimed it (0: a cancelled task never ran).
        progress: The record's last ``"current total time"`` progress, or None.
    """

    state: str
    value: Any = None
    attempts: int = 0
    progress: str | None = None


@dataclass(frozen=True)
class Pin:
    """A task that can run in one worker process alone: a call to a session or actor.

    Attributes:
        worker: The worker process the session lives in.
        session_id: The session.
        listed_in: The list the call is queued on (the session's own, or its worker's opens).
        lost: Makes the caller's error from why the session is lost.
        opening: The call opens the session (it has no record yet: only its worker's lease counts).
    """

    worker: str
    session_id: str
    listed_in: str
    lost: Callable[[str], BaseException]
    opening: bool = False


@dataclass(eq=False, slots=True)
class Wait:
    """One caller waiting for one task.

    Attributes:
        task_id: The task.
        name: Its queue.
        expiry: Its deadline (Unix seconds).
        timeout: The timeout it was submitted with, in seconds (for messages).
        on_end: Called once, from the collector thread, with how it ended.
        consume: Delete the task's record (and frames and events) once settled.
        done: The task's own done list, when its end is announced there instead of the inbox
            (a task submitted without this collector's inbox: the seed's ``submit``/``wait``).
    """

    task_id: str
    name: str
    expiry: float
    timeout: float
    on_end: Callable[[Ended], object]
    consume: bool = False
    done: str | None = None
    submitted: bool = False  # set by the submitter once the task is stored: until then no record is expected
    wake: threading.Event | None = None  # a blocked thread's: it collects itself when woken with nobody collecting
    since: float = field(default_factory=time.monotonic)
    next_locate: float = 0.0  # monotonic time of its next look for the id in a list
    locate_gap: float = LOST_AFTER
    missing_since: float | None = None  # first time it was seen in no list
    pin: Pin | None = None  # a call to a session: it runs in that worker process or nowhere


class Collector:
    """Wakes the waiters of one queue object through one blocking read of its inbox.

    Args:
        queue: The queue whose tasks it collects.
    """

    def __init__(self, queue: RedisTaskQueue) -> None:
        self.queue = queue
        self.ends = Inbox(queue.store, EVENTS_KEEP_S)  # the Redis half
        self._sessions = SessionRecords(queue.store)  # the records of sessions that calls are pinned to
        self._cond = threading.Condition()
        self._here = threading.local()  # .settling: this thread runs a waiter's callback now
        self._reset()

    def _reset(self) -> None:
        # A forked child must not pop its parent's inbox, nor wait on its parent's thread.
        self._pid = pid()
        self.client_id = uuid.uuid4().hex
        self.inbox = self.queue.keys.inbox(self.client_id)
        self._waits: dict[str, Wait] = {}
        self._thread: threading.Thread | None = None
        self._leader = threading.Lock()  # held by whoever collects now: a blocked caller or the thread
        self._guests = 0  # callers collecting (or about to) in their own thread: the collector thread waits
        self._unconsumed: list[tuple[str, End]] = []  # consumed tasks whose clean-up rides the next wake-up
        self._sweep = False  # the collector thread runs those clean-ups if no wake-up comes soon
        self._backoff = Backoff(0.1, 2.0)
        self._last_check = time.monotonic()

    def __len__(self) -> int:
        return len(self._waits)

    # -- waiters ---------------------------------------------------------------------------
    def add(self, waits: Sequence[Wait], *, summon: bool = True) -> str:
        """Expect the ends of these tasks (call before submitting them); returns the inbox key.

        The tasks must be submitted with the returned inbox as their ``notify`` list. Waiters
        settled by a callback (futures) are served by the collector thread, started here —
        or, with ``summon=False``, by the :meth:`summon` that must follow (once the submit is
        answered: by then a caller about to block on it collects itself, with no hand-off).
        """
        with self._cond:
            if self._pid != pid():
                self._reset()
            for wait in waits:
                self._waits[wait.task_id] = wait
            if summon and any(w.wake is None for w in waits):  # not per query(): a thread switch each
                self._summon()
            return self.inbox

    def summon(self) -> None:
        """Start or wake the collector thread if futures wait and no caller collects for them now."""
        with self._cond:
            self._summon()

    def _summon(self) -> None:
        """Start or wake the collector thread if it has waiters to serve (call holding ``_cond``)."""
        if self._serves():  # else none, or a caller collects for now (it summons the thread when done)
            self._wake_thread()

    def _wake_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="rtq-collector", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def remove(self, task_ids: Sequence[str]) -> None:
        """Stop waiting for these tasks (their waiter gave up or settled them itself)."""
        with self._cond:
            for task_id in task_ids:
                self._waits.pop(task_id, None)

    def expect(
        self,
        task_id: str,
        name: str,
        expiry: float,
        timeout: float,
        *,
        done: str | None = None,
        submitted: bool = False,
    ) -> Blocking:
        """Register a waiter that a thread then blocks on with :meth:`block` (``query()``)."""
        blocking = Blocking()
        blocking.wait = Wait(
            task_id, name, expiry, timeout, blocking.settle, done=done, submitted=submitted, wake=blocking.wake
        )
        self.add([blocking.wait])
        return blocking

    def block(self, blocking: Blocking, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``blocking`` to be settled; True once it is.

        While nobody else collects, the calling thread collects itself — for every waiter, its
        own outcome riding along its wake-up — so a lone ``query()`` costs no hand-off between
        threads. Otherwise it sleeps until settled, or until the collector hands on the lead.
        """
        end = time.monotonic() + timeout
        while blocking.ended is None:
            if self.lead(blocking.wait.task_id, lambda: blocking.ended is not None, end):
                break
            left = end - time.monotonic()
            if left <= 0:
                break
            # Woken when settled or handed the lead; a second at most, to try for the lead again.
            blocking.wake.wait(min(left, CHECK_PERIOD))
            blocking.wake.clear()
        return blocking.ended is not None

    def lead(self, task_id: str, done: Callable[[], bool], end: float | None) -> bool:
        """Collect in the calling thread until ``done()`` or the monotonic time ``end``, if nobody collects now.

        Stops as well once ``task_id`` is no longer waited for (settled, or its wait removed).

        A thread about to block on one of its tasks (``query()``, a future's ``result()``)
        collects itself, so its outcome rides along its own wake-up: no thread is woken to hand
        it over. The collector thread stands aside meanwhile. False when another thread
        collects (then the caller waits to be settled, or handed the lead).
        """
        with self._cond:
            self._guests += 1
        led = self._leader.acquire(blocking=False)
        try:
            if led:
                with self.queue.store.channels.channel() as channel:
                    while not done() and task_id in self._waits and (end is None or time.monotonic() < end):
                        self._round(channel)
        finally:
            if led:
                self._leader.release()
            with self._cond:
                self._guests -= 1
                self._summon()  # the futures left are the collector thread's again
            if led:
                self._hand_on()
        return led

    def _hand_on(self) -> None:
        """Wake one blocked caller to collect next, now that this one is done."""
        with self._cond:
            nxt = next((w.wake for w in self._waits.values() if w.wake is not None), None)
        if nxt is not None:
            nxt.set()

    # -- collecting ------------------------------------------------------------------------
    def _run(self) -> None:
        """The collector thread: collects while futures wait, and sweeps up consumed tasks left behind.

        A consumed task's clean-up rides the next wake-up's write; when none came within
        :data:`CHECK_PERIOD` (its caller went quiet), this thread runs it.
        """
        channel = Channel(self.queue.store.redis)  # the thread's own connection
        try:
            while True:
                sweep = False
                with self._cond:
                    if not self._serves() and not self._sweep:
                        self._cond.wait_for(lambda: self._serves() or self._sweep, timeout=IDLE_EXIT)
                        if not self._serves() and not self._sweep:
                            self._thread = None  # the next add() of a future starts a new one
                            return
                    if not self._serves():  # clean-ups are due: a wake-up has a while to take them along
                        self._cond.wait_for(self._serves, timeout=CHECK_PERIOD)
                        sweep = not self._serves()
                if sweep:
                    self._sweep_up(channel)
                    continue
                with self._leader:
                    self._round(channel)
                with self._cond:
                    done = not self._serves()
                if done:  # a blocked caller collects next, at once rather than at its next try
                    self._hand_on()
        except BaseException:  # never silently: every waiter would hang
            logger.exception("the result collector stopped")
            raise
        finally:
            channel.close()

    def _sweep_up(self, channel: Channel) -> None:
        """Run the clean-ups no wake-up took along, unless someone collects now (their wake-ups will)."""
        led = self._leader.acquire(blocking=False)
        try:
            if led:
                self._clean_up(channel)
        except TRANSIENT as exc:  # kept for the next wake-up, or the next sweep
            logger.debug("could not remove consumed tasks (%s)", exc)
        finally:
            if led:
                self._leader.release()
            with self._cond:
                self._sweep = bool(self._unconsumed)
            if led:
                self._hand_on()  # a caller that found the lead taken meanwhile takes it now

    def _serves(self) -> bool:
        """Whether the collector thread has waiters to collect for (futures, while no caller collects itself)."""
        return not self._guests and any(w.wake is None for w in self._waits.values())

    def _round(self, channel: Channel) -> None:
        """One wake-up: block on the inbox, settle what ended; or the periodic checks. Never raises."""
        store = self.queue.store
        with self._cond:
            if not self._waits:
                return
            nearest = min(w.expiry for w in self._waits.values())
            # One call awaited (``query()``, ``submit().result()``): its outcome rides along
            # the wake-up, read right after the pop in the same round trip.
            sole = next(iter(self._waits)) if len(self._waits) == 1 else None
            inbox = self.inbox
            lists = [w.done for w in self._waits.values() if w.done][:MAX_DONE_LISTS]
        now = time.monotonic()
        block = min(self.queue.interval, store.cap, CHECK_PERIOD, max(0.0, nearest - time.time()) + 0.01)
        try:
            if now - self._last_check >= CHECK_PERIOD:
                self._last_check = now
                self._clean_up(channel)
                self._check(channel)
                return
            with self._cond:
                consumed, self._unconsumed = self._unconsumed, []
            try:
                ids, sole_read = self.ends.wake(channel, inbox, lists, block, sole, consumed)
            except BaseException:
                with self._cond:  # whether they ran is unknown: they run (again, harmlessly) next time
                    self._unconsumed[:0] = consumed
                raise
            self._backoff.succeeded()
            if not ids:
                self._last_check = time.monotonic()
                self._check(channel)
                return
            self._settle(ids, channel, {sole: sole_read} if sole_read is not None and sole is not None else {})
        except TRANSIENT as exc:
            delay = self._backoff.failed()
            logger.warning("lost Redis while collecting results (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)  # Redis is away: nothing to block on but the clock
        except Exception:  # a collector that dies would hang every waiter: log and go on
            logger.exception("error while collecting results")
            time.sleep(0.1)  # never a hot loop on a persistent error

    def _clean_up(self, channel: Channel) -> None:
        """Run the clean-ups waiting for a wake-up now; on failure they wait again."""
        with self._cond:
            taken, self._unconsumed = self._unconsumed, []
        try:
            self.ends.consume(channel, taken)
        except BaseException:
            with self._cond:
                self._unconsumed[:0] = taken
            raise

    def _settle(self, task_ids: list[str], channel: Channel, read: dict[str, Any]) -> None:
        """Settle the waiters of tasks that ended, from their records (one round trip).

        An id whose record is not final (a stray or early push) leaves its waiter waiting.
        """
        with self._cond:
            waits = [self._waits[i] for i in dict.fromkeys(task_ids) if i in self._waits]
        if waits:
            self._finish(
                list(zip(waits, self.ends.ends(channel, [w.task_id for w in waits], read), strict=True)), channel
            )

    def _finish(self, pairs: list[tuple[Wait, End]], channel: Channel) -> None:
        """Settle each waiter whose task's record is final, then clean up the consumed ones."""
        ended: list[tuple[Wait, Ended]] = []
        consumed: list[tuple[str, End]] = []
        for wait, end in pairs:
            if end.error is not None:
                # A record expires with its deadline: gone at (or, with clock skew, just before)
                # it, the task ran out of time; the next check says so.
                if not (isinstance(end.error, TaskLost) and time.time() >= wait.expiry - 1.0):
                    ended.append((wait, Ended(ERROR, end.error)))
                continue
            if end.state not in FINAL_STATES:
                continue  # a stray push: the task goes on, and so does its waiter
            value = end.value
            if end.state == TaskState.FAILED and isinstance(value, TaskTimeout) and time.time() >= wait.expiry:
                # The worker stopped it at its deadline a moment before this check would have:
                # the same error, in the words of the timeout the caller gave.
                value = self._late(wait, cause=value)
            ended.append((wait, Ended(end.state, value, end.attempts, end.progress)))
            if wait.consume:
                consumed.append((wait.task_id, end))
        with self._cond:
            ended = [(w, e) for w, e in ended if self._waits.get(w.task_id) is w]
            for wait, _ in ended:
                del self._waits[wait.task_id]
        for wait, how in ended:
            try:
                wait.on_end(how)
            except Exception:
                logger.exception("a waiter of task %s failed", wait.task_id)
        # After the waiters were woken: the clean-up holds nobody up. Small ones ride along the
        # next wake-up's write (no round trip of their own); big frames are freed at once.
        now = [c for c in consumed if c[1].frames]
        with self._cond:
            self._unconsumed += [c for c in consumed if not c[1].frames]
            if len(self._unconsumed) >= CONSUME_BACKLOG:
                now += self._unconsumed
                self._unconsumed = []
            if self._unconsumed and not self._sweep:  # the collector thread sweeps up if no wake-up comes
                self._sweep = True
                self._wake_thread()
        self.ends.consume(channel, now)

    def clean_up(self) -> None:
        """Remove now what consumed tasks left, instead of with the next wake-up (an Executor's shutdown)."""
        if not self._unconsumed:
            return
        try:
            with self.queue.store.channels.channel() as channel:
                self._clean_up(channel)
        except TRANSIENT as exc:  # kept for the next wake-up; else they expire with their records
            logger.debug("could not remove consumed tasks (%s)", exc)

    # -- checks ----------------------------------------------------------------------------
    def _check(self, channel: Channel) -> None:
        """Deadlines, vanished or ended records, lapsed workers, and tasks in no list."""
        with self._cond:
            waits = list(self._waits.values())
        if not waits:
            return
        now = time.time()
        for wait in [w for w in waits if w.expiry <= now]:
            self.queue._cancel_quietly(wait.task_id)
            self._end(wait, Ended(ERROR, self._late(wait)))
        live = [w for w in waits if w.expiry > now and w.submitted]
        pinned = [w for w in live if w.pin is not None]
        if pinned:
            self._check_pinned(pinned, channel)
            live = [w for w in live if w.pin is None]
        if not live:
            return
        ended, queued, running = [], [], []
        for wait, end in zip(live, self.ends.ends(channel, [w.task_id for w in live]), strict=True):
            if not end.state and time.time() >= wait.expiry - 1.0:
                continue  # a record expires with its deadline: the next check times it out
            if not end.state or end.state in FINAL_STATES:
                ended.append((wait, end))  # settled (or TaskLost) from what was read
            elif end.state == TaskState.QUEUED:
                queued.append(wait)
            elif end.state == TaskState.RUNNING:
                running.append((wait, end.owner))
        if ended:
            self._finish(ended, channel)
        if running:
            self._check_running(running, channel)
        if queued:
            self._locate([w for w in queued if time.monotonic() >= w.next_locate], channel, running=False)

    def _check_pinned(self, waits: list[Wait], channel: Channel) -> None:
        """Calls to sessions: end those whose session closed or whose worker died with ``SessionLost``.

        A call that was running on a dead worker is failed by the reaper (never requeued); one
        still queued to a session that is gone can never run: it is cancelled, and its caller
        told why at once, not at its deadline.
        """
        pins = [w.pin for w in waits if w.pin is not None]
        sessions = self._sessions.states([(p.session_id, p.worker) for p in pins])
        gone = [
            (w, s)
            for w, p, s in zip(waits, pins, sessions, strict=True)
            if not s.alive or (s.state != OPEN and not (p.opening and not s.record))
        ]
        if not gone:
            return
        if any(not s.alive for _, s in gone):
            self.queue.reaper.reap()  # fails the calls the dead worker held, with the reason
        ends = self.ends.ends(channel, [w.task_id for w, _ in gone])
        for (wait, session), end in zip(gone, ends, strict=True):
            if end.error is not None or end.state in FINAL_STATES:
                self._finish([(wait, end)], channel)
                continue
            if end.state == TaskState.RUNNING and session.alive:
                continue  # its live worker ends it (a session closing fails what is queued to it)
            assert wait.pin is not None
            reason = session.reason if session.state == CLOSED else ""
            if not reason:
                reason = died_reason(wait.pin.worker, session.record.get("host", ""))
                self._sessions.close(wait.pin.session_id, reason, only_if_open=True)
            self.queue._cancel_quietly(wait.task_id)
            self._end(wait, Ended(ERROR, wait.pin.lost(reason)))

    def _check_running(self, running: list[tuple[Wait, str]], channel: Channel) -> None:
        """Reap lapsed owners; a task on a lapsed owner whose list lacks it is in no list."""
        lapsed = self.ends.lapsed(channel, sorted({owner for _, owner in running if owner}))
        if not lapsed:
            for wait, _ in running:
                wait.missing_since = None
            return
        self.queue.reaper.reap()
        self._locate([w for w, owner in running if owner in lapsed], channel, running=True)

    def _locate(self, waits: list[Wait], channel: Channel, *, running: bool) -> None:
        """Look for each task's id in its queue and the workers' lists, in one atomic snapshot."""
        if not waits:
            return
        expected = TaskState.RUNNING if running else TaskState.QUEUED
        found_nowhere = self.ends.nowhere(channel, [(w.task_id, w.name) for w in waits], expected)
        now = time.monotonic()
        for wait, nowhere in zip(waits, found_nowhere, strict=True):
            wait.locate_gap = min(wait.locate_gap * 2, LOCATE_EVERY)
            if not nowhere:
                wait.missing_since = None
                wait.next_locate = now + wait.locate_gap
                continue
            if wait.missing_since is None:
                wait.missing_since = now
                wait.next_locate = now + LOST_AFTER  # look again soon, to be sure
                continue
            if now - wait.missing_since >= LOST_AFTER:
                where = "a lapsed worker's list" if running else "its queue"
                lost = TaskLost(
                    f"task {wait.task_id} in {wait.name} is {expected} but its id is in no queue and no "
                    f"worker's list: Redis lost it from {where} (evicted under maxmemory? see "
                    "docs/reliability.md on maxmemory-policy)"
                )
                self._end(wait, Ended(ERROR, lost))

    @staticmethod
    def _late(wait: Wait, cause: BaseException | None = None) -> TaskTimeout:
        """The error of a task that ran past its deadline, as its caller reads it."""
        late = TaskTimeout(f"task {wait.task_id} in {wait.name} ran past its {wait.timeout:g} s timeout")
        late.__cause__ = cause
        return late

    def _end(self, wait: Wait, how: Ended) -> None:
        with self._cond:
            if self._waits.get(wait.task_id) is not wait:
                return
            del self._waits[wait.task_id]
        self._here.settling = True
        try:
            wait.on_end(how)
        except Exception:
            logger.exception("a waiter of task %s failed", wait.task_id)
        finally:
            self._here.settling = False

    def settling(self) -> bool:
        """Whether this thread is settling a waiter (running a future's done-callbacks): it cannot wait for another."""
        return bool(getattr(self._here, "settling", False))


class Blocking:
    """A thread blocked on one task (see :meth:`Collector.block`)."""

    def __init__(self) -> None:
        self.wake = threading.Event()  # set when settled, or when handed the lead
        self.ended: Ended | None = None
        self.wait: Wait

    def settle(self, how: Ended) -> None:
        self.ended = how
        self.wake.set()
