"""The client's one wait path: a single blocking read wakes every caller whose task ended.

Every task submitted through one :class:`~rtq.task_queue.RedisTaskQueue` object — by
``query()``, ``execute_task_remotely()`` or any ``rtq.Executor`` on it — announces its end by
pushing its id on that queue object's *inbox* (``<p>|<s>|inbox:<client>``). One collector at a
time blocks on the inbox, reads the outcomes of the ids it pops in the same round trip, and
hands each to its waiter: a blocked ``query()`` thread or a ``TaskFuture``. So a thousand
threads waiting in ``query()`` on one client hold one connection between them, not a thousand
(redis-py's pool would refuse the 101st), and nobody polls.

Who collects (leader and followers): a thread blocked in ``query()`` collects itself while nobody
else does — a lone call's outcome rides along its own wake-up, with no hand-off between threads
— and, once settled, wakes another blocked caller to take over. Futures, which have no thread of
their own, are served by a collector thread that runs while any future is pending.

A waiter is settled only by its task's *final* state read from the record: an id that arrives
in the inbox while the record still says queued or running (a stray push) changes nothing.

What the collector checks besides, at least every :data:`CHECK_PERIOD` seconds even while the
inbox is busy:

* deadlines: a waiter whose task ran past its timeout gets :class:`~rtq.errors.TaskTimeout`
  (and its task is cancelled);
* vanished records: :class:`~rtq.errors.TaskLost` at once;
* ended tasks whose push was lost (a Redis restart): settled from the record;
* lapsed workers: their tasks are given back (:class:`~rtq.worker.recovery.Reaper`);
* tasks that are in no list: a record that says queued while its id is in neither its queue nor
  any worker's in-progress list — or running on a lapsed worker whose list lacks it — can never
  be served (an eviction under ``maxmemory`` took the entry). Seen so twice, at least
  :data:`LOST_AFTER` seconds apart, in one atomic snapshot each time, it is
  :class:`~rtq.errors.TaskLost` — not a wait until the deadline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis as redis_py

from .backend.store import OUTCOME_FIELDS, text
from .backend.wire import Channel
from .errors import TaskLost, TaskTimeout

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["CHECK_PERIOD", "LOST_AFTER", "Blocking", "Collector", "Ended", "Wait"]

logger = logging.getLogger("rtq.client")

COLLECT_BATCH = 1000
"""Most ended ids taken from the inbox per round trip."""
CHECK_PERIOD = 1.0
"""Most seconds between two checks of the waiters' deadlines and records, busy inbox or not."""
LOST_AFTER = 1.0
"""Seconds a task must stay in no list, seen twice, before its waiter gets ``TaskLost``."""
LOCATE_EVERY = 5.0
"""Longest gap between two looks for a long-queued task's id in its queue (an O(queue) scan)."""
MAX_DONE_LISTS = 256
"""Most done lists of tasks announced elsewhere one wake-up blocks on (the rest are checked)."""
IDLE_EXIT = 30.0
"""Seconds the collector thread lingers with nothing to wait for before it ends."""
EVENTS_KEEP_S = 10.0
"""Seconds a consumed task's events (its output and progress) stay readable for late watchers."""
FINAL = ("done", "failed", "cancelled")
_READ = (*OUTCOME_FIELDS, "progress", "attempt", "params#")
"""What settles a waiter: the outcome, progress, attempts, and the params' frame list."""


@dataclass(frozen=True)
class Ended:
    """How a waited-on task ended, as handed to its waiter.

    Attributes:
        state: ``done``, ``failed`` or ``cancelled``; ``error`` when it could not be read (the
            exception is ``value``: ``TaskLost``, ``TaskTimeout``, ``SignatureError``…).
        value: The result when done, the exception when failed or ``error``.
        attempts: How many workers claimed it (0: a cancelled task never ran).
        progress: The record's last ``"current total time"`` progress, or None.
    """

    state: str
    value: Any = None
    attempts: int = 0
    progress: str | None = None


@dataclass(eq=False)
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


class Collector:
    """Wakes the waiters of one queue object through one blocking read of its inbox.

    Args:
        queue: The queue whose tasks it collects.
    """

    def __init__(self, queue: RedisTaskQueue) -> None:
        self.queue = queue
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        # A forked child must not pop its parent's inbox, nor wait on its parent's thread.
        self._pid = os.getpid()
        self.client_id = uuid.uuid4().hex
        self.inbox = self.queue.keys.inbox(self.client_id)
        self._waits: dict[str, Wait] = {}
        self._thread: threading.Thread | None = None
        self._leader = threading.Lock()  # held by whoever collects now: a blocked caller or the thread
        self._backoff = 0.0
        self._last_check = time.monotonic()

    def __len__(self) -> int:
        return len(self._waits)

    # -- waiters ---------------------------------------------------------------------------
    def add(self, waits: Sequence[Wait]) -> str:
        """Expect the ends of these tasks (call before submitting them); returns the inbox key.

        The tasks must be submitted with the returned inbox as their ``notify`` list. Waiters
        settled by a callback (futures) are served by the collector thread, started here.
        """
        with self._cond:
            if self._pid != os.getpid():
                self._reset()
            for wait in waits:
                self._waits[wait.task_id] = wait
            if any(w.wake is None for w in waits) and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="rtq-collector", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self.inbox

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
            if self._leader.acquire(blocking=False):
                try:
                    with self.queue.store.channels.channel() as channel:
                        while blocking.ended is None and time.monotonic() < end:
                            self._round(channel)
                finally:
                    self._leader.release()
                    self._hand_on()
                break
            left = end - time.monotonic()
            if left <= 0:
                break
            # Woken when settled or handed the lead; a second at most, to try for the lead again.
            blocking.wake.wait(min(left, CHECK_PERIOD))
            blocking.wake.clear()
        return blocking.ended is not None

    def _hand_on(self) -> None:
        """Wake one blocked caller to collect next, now that this one is done."""
        with self._cond:
            nxt = next((w.wake for w in self._waits.values() if w.wake is not None), None)
        if nxt is not None:
            nxt.set()

    # -- collecting ------------------------------------------------------------------------
    def _run(self) -> None:
        """The collector thread: collects while waiters settled by callbacks (futures) remain."""
        channel = Channel(self.queue.store.redis)  # the thread's own connection
        try:
            while True:
                with self._cond:
                    if not self._serves():
                        self._cond.wait_for(self._serves, timeout=IDLE_EXIT)
                        if not self._serves():
                            self._thread = None  # the next add() of a future starts a new one
                            return
                with self._leader:
                    self._round(channel)
        except BaseException:  # never silently: every waiter would hang
            logger.exception("the result collector stopped")
            raise
        finally:
            channel.close()

    def _serves(self) -> bool:
        return any(w.wake is None for w in self._waits.values())

    def _round(self, channel: Channel) -> None:
        """One wake-up: block on the inbox, settle what ended; or the periodic checks. Never raises."""
        store, keys = self.queue.store, self.queue.keys
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
                self._check(channel)
                return
            commands: list[tuple[Any, ...]] = [
                ("BLPOP", inbox, *lists, max(0.01, block)),
                ("LPOP", inbox, COLLECT_BATCH),
            ]
            if sole is not None:
                commands.append(("HMGET", keys.task(sole), *_READ))
            item, more, *ahead = channel.pipeline(commands)
            for reply in (item, more, *ahead):
                if isinstance(reply, Exception):
                    raise reply
            self._backoff = 0.0
            if item is None and not more:
                self._last_check = time.monotonic()
                self._check(channel)
                return
            ids = [text(i) for i in ([item[1]] if item else []) + (more or [])]
            # Read after the pop: final if the sole call is among those that ended.
            self._settle(ids, channel, {sole: ahead[0]} if sole is not None and sole in ids else {})
        except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
            self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
            logger.warning("lost Redis while collecting results (%s); retrying in %.1fs", exc, self._backoff)
            time.sleep(self._backoff)  # Redis is away: nothing to block on but the clock
        except Exception:  # a collector that dies would hang every waiter: log and go on
            logger.exception("error while collecting results")
            time.sleep(0.1)  # never a hot loop on a persistent error

    def _settle(self, task_ids: list[str], channel: Channel, read: dict[str, Any]) -> None:
        """Settle the waiters of tasks that ended, from their records (one round trip).

        An id whose record is not final (a stray or early push) leaves its waiter waiting.
        """
        with self._cond:
            waits = [self._waits[i] for i in dict.fromkeys(task_ids) if i in self._waits]
        if not waits:
            return
        keys = self.queue.keys
        unread = [("HMGET", keys.task(w.task_id), *_READ) for w in waits if w.task_id not in read]
        fetched = iter(channel.pipeline(unread) if unread else [])
        values = [read[w.task_id] if w.task_id in read else next(fetched) for w in waits]
        self._finish(list(zip(waits, values, strict=True)), channel)

    def _finish(self, pairs: list[tuple[Wait, Any]], channel: Channel) -> None:
        """Settle each waiter whose record (``_READ`` values) is final, then clean up consumed ones."""
        store, keys = self.queue.store, self.queue.keys
        n = len(OUTCOME_FIELDS)
        ended: list[tuple[Wait, Ended]] = []
        cleanup: list[tuple[Any, ...]] = []
        consume = store.scripts["consume"]
        for wait, values in pairs:
            try:
                if isinstance(values, Exception):
                    raise values
                progress, attempts, params_list = values[n:]
                state, value = store.outcome(wait.task_id, values[:n])  # TaskLost when it vanished
            except redis_py.ConnectionError:
                raise
            except TaskLost as exc:
                # A record expires with its deadline: gone at (or, with clock skew, just before)
                # it, the task ran out of time; the next check says so.
                if time.time() < wait.expiry - 1.0:
                    ended.append((wait, Ended("error", exc)))
                continue
            except Exception as exc:  # unreadable or gone: that is how this wait ends
                ended.append((wait, Ended("error", exc)))
                continue
            if state not in FINAL:
                continue  # a stray push: the task goes on, and so does its waiter
            if state == "failed" and isinstance(value, TaskTimeout) and time.time() >= wait.expiry:
                # The worker stopped it at its deadline a moment before this check would have:
                # the same error, in the words of the timeout the caller gave.
                value = self._late(wait, cause=value)
            ended.append((wait, Ended(state, value, _attempts(attempts), text(progress) or None)))
            if wait.consume:
                lists = [params_list, values[OUTCOME_FIELDS.index("result#")], values[OUTCOME_FIELDS.index("error#")]]
                frames = store.frame_keys(keys.task(wait.task_id), lists)
                task_keys = [keys.task(wait.task_id), keys.events(wait.task_id), keys.done(wait.task_id), *frames]
                cleanup.append(("EVALSHA", consume.sha, len(task_keys), *task_keys, int(EVENTS_KEEP_S * 1000)))
        with self._cond:
            ended = [(w, e) for w, e in ended if self._waits.get(w.task_id) is w]
            for wait, _ in ended:
                del self._waits[wait.task_id]
        for wait, how in ended:
            try:
                wait.on_end(how)
            except Exception:
                logger.exception("a waiter of task %s failed", wait.task_id)
        if cleanup:  # after the waiters were woken: the clean-up holds nobody up
            replies = channel.pipeline(cleanup)
            if any(isinstance(r, redis_py.exceptions.NoScriptError) for r in replies):
                channel.execute("SCRIPT", "LOAD", consume.script)
                channel.pipeline(cleanup)

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
            self._end(wait, Ended("error", self._late(wait)))
        live = [w for w in waits if w.expiry > now and w.submitted]
        if not live:
            return
        keys = self.queue.keys
        replies = channel.pipeline([("HMGET", keys.task(w.task_id), *_READ, "owner") for w in live])
        ended, queued, running = [], [], []
        for wait, values in zip(live, replies, strict=True):
            if isinstance(values, Exception):
                raise values
            state = text(values[0])
            if not state and time.time() >= wait.expiry - 1.0:
                continue  # a record expires with its deadline: the next check times it out
            if not state or state in FINAL:
                ended.append((wait, values[:-1]))  # settled (or TaskLost) from what was read
            elif state == "queued":
                queued.append(wait)
            elif state == "running":
                running.append((wait, text(values[-1])))
        if ended:
            self._finish(ended, channel)
        if running:
            self._check_running(running, channel)
        if queued:
            self._locate([w for w in queued if time.monotonic() >= w.next_locate], channel, running=False)

    def _check_running(self, running: list[tuple[Wait, str]], channel: Channel) -> None:
        """Reap lapsed owners; a task on a lapsed owner whose list lacks it is in no list."""
        keys = self.queue.keys
        owners = sorted({owner for _, owner in running if owner})
        alive = channel.pipeline([("EXISTS", keys.worker(o)) for o in owners]) if owners else []
        lapsed = {o for o, a in zip(owners, alive, strict=True) if not isinstance(a, Exception) and not a}
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
        keys = self.queue.keys
        workers = [text(w) for w in channel.execute("ZRANGE", keys.workers(), 0, -1)]
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        for wait in waits:
            commands.append(("HGET", keys.task(wait.task_id), "state"))
            commands.append(("LPOS", keys.queue(wait.name), wait.task_id))
            commands += [("LPOS", keys.running(w), wait.task_id) for w in workers]
        commands.append(("EXEC",))
        replies = channel.pipeline(commands)
        snapshot = replies[-1]
        if isinstance(snapshot, Exception):
            raise snapshot
        per = 2 + len(workers)
        now = time.monotonic()
        for i, wait in enumerate(waits):
            state, *places = snapshot[i * per : (i + 1) * per]
            expected = "running" if running else "queued"
            nowhere = text(state) == expected and all(p is None for p in places)
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
                self._end(wait, Ended("error", lost))

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
        try:
            wait.on_end(how)
        except Exception:
            logger.exception("a waiter of task %s failed", wait.task_id)


class Blocking:
    """A thread blocked on one task (see :meth:`Collector.block`)."""

    def __init__(self) -> None:
        self.wake = threading.Event()  # set when settled, or when handed the lead
        self.ended: Ended | None = None
        self.wait: Wait

    def settle(self, how: Ended) -> None:
        self.ended = how
        self.wake.set()


def _attempts(raw: Any) -> int:
    try:
        return int(text(raw) or 0)
    except ValueError:
        return 1
