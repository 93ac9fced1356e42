"""A worker's heartbeat: its lease, its queues' markers, and what it checks on every beat.

Every ``period`` the watchdog thread of a :class:`~rtq.worker.listener.Listener`

* refreshes the worker's lease and record and the listener markers of its queues;
* gives back the tasks of workers whose lease lapsed (:class:`~rtq.worker.recovery.Reaper`);
* stops running tasks nobody wants any more — cancelled, taken over, vanished or past their
  deadline — which is how a task that never calls ``update()`` learns it (:mod:`rtq.worker.stopper`);
* gives back ids sitting in the worker's in-progress list that it does not hold.

A task holding the GIL freezes this thread too, so a helper process (:mod:`rtq.worker.heartbeat`)
keeps the lease and markers alive as well; the watchdog starts it, restarts it if it died, and
tells it when the worker drains.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ..backend.connections import RedisError
from ..backoff import Backoff
from ..errors import TaskCancelled, TaskTimeout
from ..task import TaskState
from .heartbeat import HeartbeatHelper
from .metrics import Metrics

if TYPE_CHECKING:
    from ..backend.workers import WorkerRegistry
    from .heartbeat import HelperSettings
    from .recovery import Reaper
    from .state import WorkerState

__all__ = ["Watchdog"]

logger = logging.getLogger("rtq.worker")


class Watchdog:
    """The heartbeat thread (and helper process) of one worker.

    Args:
        state: The worker's shared state; the watchdog reads what it holds (under its lock).
        registry: Leases, records and markers in Redis.
        reaper: Gives back the tasks of lapsed workers (and ids this one lost track of).
        helper: How a helper process reaches Redis; None runs without one.
        metrics: Samples the host, process and GPU fields of each beat's record (default: this
            process's, see :mod:`rtq.worker.metrics`).
    """

    def __init__(
        self,
        state: WorkerState,
        registry: WorkerRegistry,
        reaper: Reaper,
        helper: HelperSettings | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.state = state
        self.registry = registry
        self.reaper = reaper
        self.helper_settings = helper
        self.metrics = metrics if metrics is not None else Metrics()
        self.stopped = threading.Event()
        self.helper: HeartbeatHelper | None = None
        self.suspects: dict[str, float] = {}  # ids in our list we do not hold, and since when
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Beat once (the worker is announced before it claims anything), then keep beating."""
        self.beat()
        self._start_helper()
        self._thread = threading.Thread(target=self._loop, name=f"rtq-heartbeat-{self.state.id}", daemon=True)
        self._thread.start()

    def draining(self) -> None:
        """The worker stopped claiming: the helper stops marking its queues."""
        if self.helper is not None:
            self.helper.drain()

    def stop(self) -> None:
        """End the heartbeat thread (after the running tasks ended or were given back)."""
        self.stopped.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stop the helper and remove the worker's record, lease and markers."""
        if self.helper is not None:
            self.helper.close()
        self.metrics.close()
        self._retire()

    def _start_helper(self) -> None:
        if self.helper_settings is None:
            return
        self.helper = HeartbeatHelper(self.helper_settings.config(self.state, os.getpid()))
        if self.helper.start():
            self.state.info["heartbeat_pid"] = self.helper.pid

    def _retire(self) -> None:
        try:
            self.registry.retire(self.state.id, self.state.names)
        except RedisError:
            logger.warning("could not remove worker record %s", self.state.id)

    # -- the beat --------------------------------------------------------------------------
    def beat(self) -> None:
        """Refresh this worker's lease and record, and the listener markers."""
        state = self.state
        with state.lock:
            running_ids = list(state.active)
            done = state.tasks_done
        stopping = state.stopping.is_set()
        record = {
            **state.info,
            **self.metrics.sample(),
            "beat": time.time(),
            "running": running_ids,
            "done": done,
            "stopping": stopping,
        }
        self.registry.beat(state.id, record, state.lease, [] if stopping else state.names, state.marker_ttl)

    def _loop(self) -> None:
        state = self.state
        # Never back off past a third of the lease: once Redis is back, the lease must be too.
        backoff = Backoff(state.period, max(state.period, min(5.0, state.lease / 3)), rest=state.period)
        while not self.stopped.wait(backoff.delay):
            if self.helper is not None:
                self.helper.ensure()
                # A restarted helper has a new pid: the record names the live one.
                state.info["heartbeat_pid"] = self.helper.pid
            try:
                self.beat()
                self.reaper.reap(exclude=state.id)
                self._watch()
                self._audit()
            except RedisError as exc:
                # Once per outage: a Redis restart must not flood the worker's log.
                level = logging.DEBUG if backoff.failing else logging.WARNING
                backoff.failed()
                logger.log(level, "heartbeat failed (%s); retrying", exc)
                continue
            if backoff.failing:
                logger.warning("heartbeat restored")
            backoff.succeeded()

    def _watch(self) -> None:
        """Stop running tasks nobody wants any more: cancelled, taken over, vanished or expired.

        A task that calls ``update()`` learns it there; this reaches the ones that never do
        (see :mod:`rtq.worker.stopper` for what it can and cannot interrupt).
        """
        worker = self.state
        runs = worker.running()
        if not runs:
            return
        claims = self.registry.claims([run.id for run in runs])
        now = time.time()
        for run, claim in zip(runs, claims, strict=True):
            state, owner, attempt, token = claim.state, claim.owner, claim.attempt, claim.token
            task, stopper = run.task, run.stopper
            if stopper.finished:
                continue  # it ended by itself; its record may already be stored or read and gone
            exc_type: type[BaseException] = TaskCancelled
            mine = owner == worker.id and attempt == str(run.attempt)
            if run.token and token is not None and token != run.token:
                mine = False
            if state is None:
                reason = "lost its data in Redis (restart, eviction or flush)"
            elif state == TaskState.CANCELLED:
                reason = "was cancelled"
            elif state != TaskState.RUNNING or not mine:
                reason = "was taken over by another worker"
            elif task.expiry < now:
                reason, exc_type = "ran past its deadline", TaskTimeout
            else:
                continue
            if stopper.noticed is None:
                stopper.noticed = now
            window = max(1.0, 2 * worker.period)
            reported = now - task._reporter.reported_at
            if exc_type is TaskCancelled and reported < window and now - stopper.noticed < window:
                continue  # it calls update(), which raises at a point of its own choosing
            if not stopper.requested:
                logger.warning("stopping task %s in %s: it %s", task.id, task.name, reason)
                if state is None:  # wake its caller now, who then finds the data gone
                    self.registry.wake(run.notify, task.id)
            stopper.stop(exc_type, reason)

    def _audit(self) -> None:
        """Give back ids sitting in this worker's list that it does not hold.

        BLMOVE can move an id whose reply never arrives (a connection dropped mid-call, a Redis
        restart with persistence): the id would sit in a live worker's list forever. One seen
        there, unheld, for a whole lease goes back to its queue.
        """
        state = self.state
        listed = set(self.registry.claimed(state.id))
        held = state.held()
        now = time.monotonic()
        self.suspects = {i: self.suspects.get(i, now) for i in listed - held}
        due = [i for i, since in self.suspects.items() if now - since >= max(state.lease, 3 * state.period)]
        if due:
            logger.warning("giving back task(s) this worker lost track of: %s", ", ".join(due))
            self.reaper.give_back(state.id, refund=True, only=due)
            for task_id in due:
                self.suspects.pop(task_id, None)
