"""The loop behind :meth:`RedisTaskQueue.listen`: claim, run, report, recover.

Claim threads (up to two per queue, :mod:`rtq.worker.claiming`) take a task only while a slot
is free, and move its id atomically (BLMOVE) from the queue, so an id is never held only in
memory; claim.lua, sent in the same write and run by the server right after the move, puts it in
this listener's in-progress list, makes it this worker's (owner, attempt) and hands over its
data, and the thread that claimed it runs it. Around that loop:

* :mod:`rtq.worker.watchdog` keeps the worker's lease and its queues' markers fresh (with a helper
  process a task holding the GIL cannot starve), gives back the tasks of lapsed workers, and
  stops running tasks nobody wants any more;
* :mod:`rtq.worker.outcome` stores each task's result or exception, fenced by its claim;
* :mod:`rtq.worker.capture` sends what a task prints, and progress goes through ``progress.lua``;
* :mod:`rtq.worker.sessions` holds the sessions and actors opened here, each served by a thread
  of its own from its own call list (:meth:`Listener.take_from`).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..backend.connections import TRANSIENT, RedisError
from ..backend.eviction import eviction_warning
from ..backend.keys import check_name
from ..backend.store import text
from ..backend.wire import Channel
from ..buffercache import BufferCache, default_cache_bytes
from ..errors import RtqError, SerializationError, SignatureError, TaskCancelled
from ..task import RedisTask, Reporter, TaskState, outcome_stored_by_runner, running
from .capture import capturing
from .claiming import WAITING, Claiming, Lane
from .heartbeat import HelperSettings
from .outcome import OutcomeWriter
from .recovery import Reaper
from .run import Run
from .sessions import DEFAULT_IDLE, DEFAULT_LIMIT, SessionHost
from .slots import Slots
from .state import WorkerState
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..backend.store import TaskStore

logger = logging.getLogger("rtq.worker")

LEASE = 10.0
"""Seconds a worker's heartbeat stays valid; a lapsed worker's tasks are requeued."""
CLAIM_BATCH = 32
"""Most tasks one claim round takes at once (never more than the worker's free slots)."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Listener:
    """Serves some queues of one namespace, running each task it claims with ``run``.

    Made by :meth:`RedisTaskQueue.listener` (``listen()``, ``rtq worker``), whose
    ``execute_task_locally`` is the ``run``; the listener stores each outcome, fenced by its claim.

    Args:
        store: The namespace's task records.
        run: Runs one task and returns its result (or raises its error).
        names: Queue names to serve.
        interval: Longest one blocking wait lasts (seconds) before stop events are checked.
        marker_ttl: Seconds a queue's listener marker lives (the queue's ``timeout``).
        max_attempts: The attempt limit for records that carry none of their own.
        workers: Tasks that may run at once.
        event: Stops the listener when set.
        lease: Seconds this worker's heartbeat stays valid.
        grace: On stop, seconds running tasks get to finish before they are requeued
            (None: wait for them).
        info: Extra fields announced in this worker's heartbeat record.
        heartbeat_process: Also keep the lease alive from a helper process, which a task holding
            the GIL cannot starve (see :mod:`rtq.worker.heartbeat`).
        sessions: Most sessions and actors this worker holds at once (see :mod:`rtq.worker.sessions`).
        session_idle: Seconds a session may go unused before it is closed.
        cache_bytes: Keep buffers read by digest in memory, up to this many bytes (see
            :mod:`rtq.buffercache`), so a task given the same array again skips reading it from
            Redis; 0 keeps none; None: a quarter of the machine's memory, at most 4 GiB.
    """

    def __init__(
        self,
        store: TaskStore,
        run: Callable[[RedisTask], Any],
        names: list[str],
        *,
        interval: float,
        marker_ttl: float,
        max_attempts: int,
        workers: int = 128,
        event: threading.Event | None = None,
        lease: float = LEASE,
        grace: float | None = None,
        info: dict[str, Any] | None = None,
        worker_id: str | None = None,
        heartbeat_process: bool = True,
        sessions: int = DEFAULT_LIMIT,
        session_idle: float = DEFAULT_IDLE,
        cache_bytes: int | None = None,
    ) -> None:
        if not names:
            raise ValueError("listen() needs at least one queue name")
        for name in names:  # all of them before any marker is written
            check_name("queue name", name)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        self.run_task = run
        self.interval = interval
        self.marker_ttl = marker_ttl
        self.names = names
        self.workers = workers
        self.event = event or threading.Event()
        self.lease = lease
        self.grace = grace
        self.id = worker_id or new_worker_id()
        self.keys = store.keys
        self.store = store
        cache_bytes = default_cache_bytes() if cache_bytes is None else cache_bytes
        store.blobs.cache = BufferCache(cache_bytes) if cache_bytes else None
        self.redis = store.redis
        self.info = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": names,
            "workers": workers,
            "session_limit": sessions,
            "sessions": [],
            "started": time.time(),
            **(info or {}),
        }
        self.free = Slots(workers)  # first come, first served: several queues take turns
        self.state = WorkerState(
            self.id, names, lease, self.period, marker_ttl, self.info, self.event, threading.Lock()
        )
        # The shared containers, by their short names (the same objects).
        self.active, self.lock, self.claiming = self.state.active, self.state.lock, self.state.claiming
        self.idle = threading.Condition(self.lock)
        self.reaper = Reaper(store, max_attempts)
        self.registry = self.reaper.registry  # leases, records, markers: the Redis half of the watchdog
        self.outcomes = OutcomeWriter(self.store, self.id)
        self.claims = self.outcomes.claims  # the Redis half of claiming, reporting and finishing
        self.abandoned: list[str] = []  # tasks still running after shutdown requeued them
        helper = HelperSettings.of(self.redis, self.keys) if heartbeat_process else None
        self.watchdog = Watchdog(self.state, self.registry, self.reaper, helper)
        self.sessions = SessionHost(self, store, limit=sessions, idle=session_idle)
        self._landings = itertools.count()  # numbers the landing lists of this worker's threads
        # Test hook: pause right after BLMOVE, before claim.lua, writing the id to this file.
        self.pause_after_move = os.environ.get("RTQ_TEST_PAUSE_AFTER_MOVE")

    @property
    def period(self) -> float:
        """Seconds between heartbeats: several per lease and several per marker lifetime."""
        return max(0.05, min(self.lease / 5, self.interval, self.marker_ttl / 3))

    @property
    def tasks_done(self) -> int:
        """How many tasks this worker finished."""
        return self.state.tasks_done

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until the stop event is set, then let running tasks end (or requeue them)."""
        warning = eviction_warning(self.redis)
        if warning:
            logger.warning("%s", warning)
        # The record first (the first beat writes it with the markers): a caller that sees a queue
        # marked finds the worker that marks it, with room for sessions, among the live ones.
        self.watchdog.start()
        self.sessions.start()
        for name in self.names:
            self.store.mark_listened(name, self.marker_ttl)
        # A thread per slot, and those waiting on each queue while the slots' tasks run.
        pool = ThreadPoolExecutor(self.workers + WAITING * len(self.names), thread_name_prefix="rtq-task")
        contended = self.workers < len(self.names)
        wait_cap = min(self.interval, self.store.cap, 0.1 if contended else float("inf"))
        claims = [Claiming(name, self.keys.queue(name), wait_cap, self.lane) for name in self.names]
        for claiming in claims:
            pool.submit(self._claim_and_run, claiming, pool)
        logger.info("worker %s listening on %s with %d slots", self.id, ", ".join(self.names), self.workers)
        try:
            self.event.wait()
        finally:
            self.event.set()
            try:
                self.watchdog.draining()
                for claiming in claims:
                    claiming.ended.wait()
                self._give_back_landed()
                self._drain(pool)
                host = self.info["host"]
                self.sessions.close_all(f"worker stopped: its worker {self.id} on {host} was shut down")
                self.watchdog.stop()
            finally:
                self.watchdog.close()

    def stop(self) -> None:
        self.event.set()

    def _give_back_landed(self) -> None:
        """Requeue what the claim threads left in their landing lists (a claim that never ran)."""
        try:
            landed = self.registry.land(self.id)
            if landed:
                self.reaper.give_back(self.id, refund=True, only=landed)
        except RedisError as exc:  # they stay listed: any worker requeues them once this lease lapses
            logger.warning("could not requeue the ids moved but not claimed (%s)", exc)

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        with self.idle:
            finished = self.idle.wait_for(lambda: not self.active, timeout=self.grace)
            ids = list(self.active)
        if not finished:
            logger.warning("grace period over: requeueing %d running task(s): %s", len(ids), ", ".join(ids))
            try:
                self.reaper.give_back(self.id, refund=True)
            except RedisError as exc:  # they stay in our list: any worker requeues them
                logger.warning("could not requeue %s (%s); they return when this lease lapses", ids, exc)
            with self.idle:
                for active in self.active.values():
                    active.stopper.stop(TaskCancelled, "was requeued: its worker shut down")
                # A task inside a long C call cannot be stopped; the caller exits without it.
                if not self.idle.wait_for(lambda: not self.active, timeout=max(1.0, self.period)):
                    self.abandoned = list(self.active)
        pool.shutdown(wait=finished, cancel_futures=True)

    # -- claiming --------------------------------------------------------------------------
    def _claim_and_run(self, claiming: Claiming, pool: ThreadPoolExecutor) -> None:
        """Claim from one queue until a task comes, run that task in this very thread, and repeat.

        A task starts in the thread that claimed it, without waiting to be handed over (a
        thread wake-up and a GIL switch on every task's path), while its queue is served on
        without a pause by another thread waiting on it (see :mod:`rtq.worker.claiming`).
        """
        lane = claiming.lane()
        while True:
            try:
                run = self._claim_next(claiming, lane, pool)
            except BaseException:
                claiming.leave(lane)
                raise
            if run is None:  # stopped: this thread's claiming ends here
                claiming.leave(lane)
                return
            if claiming.taken():  # nobody else waits on the queue: start someone
                try:
                    pool.submit(self._claim_and_run, claiming, pool)
                except RuntimeError:  # the pool shut down; cannot happen while run() waits for claiming
                    logger.exception("claiming from %s ended early", claiming.name)
                    claiming.not_started()
            self._execute(run)
            if not claiming.rejoin(self.event.is_set()):
                claiming.idle(lane)
                return

    def _claim_next(self, claiming: Claiming, lane: Lane, pool: ThreadPoolExecutor) -> Run | None:
        """The next attempt claimed from ``claiming``'s queue through ``lane`` (None once stopped).

        It takes a task only while a slot is free, and with more free slots claims more queued
        tasks in the same round trips; those go to the pool. The task returned holds a slot.
        """
        name = claiming.name
        while not self.event.is_set():
            if not self.free.acquire(timeout=self.interval):
                continue
            slots = 1  # free slots this iteration holds; each task claimed takes one
            try:
                if self.event.is_set():  # stopped while waiting for a slot
                    break
                if claiming.backoff.failing:
                    self.event.wait(claiming.backoff.delay)
                    if self.event.is_set():
                        break
                # More free slots: take more queued ids in the same round trip.
                while slots < CLAIM_BATCH and self.free.acquire(blocking=False):
                    slots += 1
                runs = self._take(lane, claiming, slots - 1)
                claiming.backoff.succeeded()
                for run in runs[1:]:
                    pool.submit(self._execute, run)
                    slots -= 1
                if runs:
                    slots -= 1
                    return runs[0]
            except RedisError as exc:
                delay = claiming.backoff.failed(at_least=0.1)
                logger.warning("cannot claim from %s (%s); retrying in %.1fs", name, exc, delay)
            except Exception:  # hostile data must never end the claiming: log, skip, go on
                logger.exception("skipped a task in %s that could not be claimed", name)
                claiming.backoff.failed()  # never a hot loop
            finally:
                for _ in range(slots):
                    self.free.release()
        return None

    def _take(self, lane: Lane, claiming: Claiming, more: int) -> list[Run]:
        """Wait for the next id of ``claiming``'s queue and claim it (and up to ``more`` others), in one round trip."""
        moved: list[str] = []

        def hold(ids: list[str]) -> None:  # ids in our list: ours to claim, not the audit's
            with self.lock:
                self.claiming.update(ids)
            moved.extend(ids)

        if self.pause_after_move and self._pause_for_tests(lane, claiming):
            return []
        try:
            claims = self.claims.take(
                lane.channel,
                claiming.key,
                claiming.name,
                lane.landing,
                claiming.wait_cap,
                more,
                hold,
                register=not lane.registered,
            )
            lane.registered = True
            return self._unless_stopped(self._runs(claims, claiming.name))
        finally:
            with self.lock:
                self.claiming.difference_update(moved)

    def _runs(self, claims: list[tuple[str, Any]], queue_name: str) -> list[Run]:
        """The attempts now ours among ``claims`` (:meth:`Claims.claim`), in queue order; held in ``active``."""
        runs = []
        for claimed_id, reply in claims:
            try:
                if isinstance(reply, Exception):
                    raise reply
                run = self._run_of_claim(claimed_id, queue_name, reply)
            except Exception as exc:  # this id stays listed; the audit gives it back
                logger.warning("could not claim task %s (%s)", claimed_id, exc)
                continue
            if run is None:
                continue
            with self.lock:
                self.active[run.id] = run
            runs.append(run)
        return runs

    def _unless_stopped(self, runs: list[Run]) -> list[Run]:
        """``runs``, or none when the worker stopped while their claim was on its way: those go back, unrun.

        The claim rode the blocking move, so the attempts are already ours; a stopping worker
        requeues them with the attempt refunded. Entries the claim skipped or dead-lettered
        were handled (and logged) by :meth:`_runs` before this.
        """
        if not runs or not self.event.is_set():
            return runs
        ids = [run.id for run in runs]
        try:
            self.reaper.give_back(self.id, refund=True, only=ids)
        finally:  # on a Redis error they stay in our list: any worker requeues them once the lease lapses
            with self.idle:
                for task_id in ids:
                    self.active.pop(task_id, None)
                self.idle.notify_all()
        return []

    def _claim_batch(self, channel: Channel, queue_name: str, task_id: str, *, stopping: bool = False) -> list[Run]:
        """Claim ``task_id``, just moved into our list (a session's call); the attempt, if now ours."""
        with self.lock:
            self.claiming.add(task_id)
        try:
            if self.event.is_set() and not stopping:  # stopped during the blocking move: put it back
                self.reaper.give_back(self.id, refund=True, only=[task_id])
                return []
            return self._runs(self.claims.claim(channel, task_id, queue_name, 0, lambda extra: None), queue_name)
        finally:
            with self.lock:
                self.claiming.discard(task_id)

    def claim_from(
        self, channel: Channel, key: str, queue_name: str, wait: float, *, stopping: bool = False
    ) -> Run | None:
        """Claim the next id of the list ``key`` (a session's calls), waiting up to ``wait`` s; None if none.

        The attempt returned is held (in ``active``) but takes no task slot: a session's thread runs it.
        ``stopping``: claim it even though the worker stops (to fail it, not to run it).
        """
        moved = self.claims.move_from(channel, key, wait)
        if moved is None:
            return None
        runs = self._claim_batch(channel, queue_name, moved, stopping=stopping)
        if not runs:
            return None
        runs[0].slot = False
        return runs[0]

    def lane(self) -> Lane:
        """A connection, and a landing list no other thread uses (give it back with :meth:`release`)."""
        return Lane(Channel(self.redis), self.keys.landing(self.id, next(self._landings)))

    def release(self, lane: Lane) -> None:
        """A thread is done with ``lane`` for good (a session closed): close it, forget its landing list."""
        lane.channel.close()
        if lane.registered:
            try:
                self.registry.drop_landing(self.id, lane.landing)
            except RedisError as exc:  # it stays in the set, empty, until the worker retires
                logger.debug("could not forget landing list %s (%s)", lane.landing, exc)

    def take_from(self, lane: Lane, key: str, queue_name: str, wait: float) -> Run | None:
        """Claim the next id of the list ``key`` (a session's calls) through ``lane``, in one round trip; None if none.

        Waits up to ``wait`` s. The attempt returned is held (in ``active``) but takes no task
        slot: a session's thread runs it.
        """
        claims = self.claims.take(
            lane.channel, key, queue_name, lane.landing, wait, 0, lambda extra: None, register=not lane.registered
        )
        lane.registered = True
        runs = self._unless_stopped(self._runs(claims, queue_name))
        if not runs:
            return None
        runs[0].slot = False
        return runs[0]

    def announce(self) -> None:
        """Write this worker's heartbeat record now (the sessions it holds changed)."""
        self.watchdog.beat()

    def refuse(self, run: Run, exc: BaseException) -> None:
        """Fail a claimed attempt with ``exc`` without running it (a call to a session that closed)."""
        try:
            self.outcomes.finish(run, TaskState.FAILED, exc)
        finally:
            with self.idle:
                self.active.pop(run.id, None)
                self.idle.notify_all()

    def _pause_for_tests(self, lane: Lane, claiming: Claiming) -> bool:
        """Move an id into ``lane``'s landing list alone and hold it there, unclaimed, until stopped.

        A test kills the worker right there (the id in no queue and no worker's list), or stops
        it: then the id goes back to its queue. True when an id came.
        """
        keys = self.keys
        channel = lane.channel
        channel.execute("SADD", keys.landings(self.id), lane.landing)
        lane.registered = True
        moved = channel.execute("BLMOVE", claiming.key, lane.landing, "LEFT", "RIGHT", claiming.wait_cap)
        if moved is None:
            return False
        with open(self.pause_after_move, "a") as fh:  # type: ignore[arg-type]
            fh.write(f"{text(moved)}\n")
        self.event.wait()
        return True

    def _run_of_claim(self, task_id: str, queue_name: str, reply: Any) -> Run | None:
        """The attempt claim.lua handed over, or None when it was skipped or refused (then failed)."""
        key = self.keys.task(task_id)
        if not reply:
            logger.info("skipped task %s in %s: it was cancelled", task_id, queue_name)
            return None
        if isinstance(reply, (bytes, str)):  # claim.lua dead-lettered the entry, with this reason
            logger.warning("dropped task %s from queue %s (dead-lettered): %s", task_id, queue_name, text(reply))
            return None
        attempt, token, expiry, first, extra, name, notify = reply
        task = RedisTask(id=task_id, name="", params=None, expiry=0.0)
        run = Run(task, int(attempt), notify=self.keys.done(task_id))
        try:
            # Everything read here may have been written by anyone with access to the Redis:
            # a malformed field fails this task, never the claim loop.
            try:
                task.expiry = float(text(expiry))
                run.token = text(token)
                task.name = text(name)
                run.notify = text(notify) or run.notify
            except ValueError as exc:
                raise SerializationError(f"task {task_id} has malformed fields: {exc}") from exc
            try:
                task.params = self.store.decode(key, "params", first, extra or None)
            except (SerializationError, SignatureError, RedisError):
                raise  # refused below; Redis trouble leaves the id listed, for the audit to give back
            except Exception as exc:  # MemoryError and the like: the next claim would fail alike
                raise SerializationError(
                    f"payload at {key} [params] cannot be read here: {type(exc).__name__}: {exc}"
                ) from exc
        except (SerializationError, SignatureError) as exc:
            level = logging.ERROR if isinstance(exc, SignatureError) else logging.WARNING
            logger.log(level, "refused task %s in %s: %s", task_id, task.name, exc)
            self.outcomes.finish(run, TaskState.FAILED, exc, dead_letter=True)
            return None
        return run

    # -- running ---------------------------------------------------------------------------
    def execute(self, run: Run) -> None:
        """Run a claimed attempt and store its outcome (a session's thread runs its calls so)."""
        self._execute(run)

    def _execute(self, run: Run) -> None:
        task, held, stopper = run.task, run.held, run.stopper

        def report(t: RedisTask) -> str | None:
            run.flush_output()  # what it printed before this point, first
            try:
                # Shielded: a stop landing mid-call would leave a shared connection with an
                # unread reply; the state returned here stops the task just as well.
                with stopper.shielded():
                    state = self.claims.progress(
                        held, f"{t.current_progress!r} {t.total_progress!r} {t.update_progress_time!r}"
                    )
            except TRANSIENT as exc:
                # Redis away for a moment: the task goes on; its outcome is stored once it is back.
                logger.warning("could not report the progress of task %s (%s)", task.id, exc)
                return TaskState.RUNNING
            return state if state is not None else TaskState.LOST

        task._reporter = Reporter(send=report, describe=run.describe)
        task._save = lambda: report(task) and None
        try:
            try:
                # capturing() sends the task's last output on exit, before _finish stores the outcome
                # Through execute_task_locally, the seed's override point; the outcome is ours to store.
                with (
                    running(task),
                    capturing(self.store, run, self.id),
                    self.sessions.hosting(run.session),
                    stopper.armed(),
                    outcome_stored_by_runner(task),
                ):
                    result = self.run_task(task)
            except BaseException as exc:  # a task must never take its worker down
                if stopper.exc_type is not None and isinstance(exc, stopper.exc_type) and not str(exc):
                    exc = stopper.exc_type(f"Task {task.id} in {task.name} {stopper.reason}")  # raised bare
                _call(run.ran)
                self.outcomes.finish(run, TaskState.FAILED, exc)
            else:
                _call(run.ran)
                self.outcomes.finish(run, TaskState.DONE, result)
        except Exception:
            logger.exception("could not store the outcome of task %s", task.id)
        finally:
            with self.idle:
                self.active.pop(task.id, None)
                self.state.tasks_done += 1
                self.idle.notify_all()
            if run.slot:
                self.free.release()


def _call(hook: Callable[[], object] | None) -> None:
    if hook is None:
        return
    try:
        hook()
    except Exception:  # a bookkeeping hook must never cost a task its outcome
        logger.exception("a hook after running a task failed")


__all__ = ["Listener", "RtqError"]
