"""The loop behind :meth:`RedisTaskQueue.listen`: claim, run, report, recover.

One claim thread per queue takes a task only while a slot is free, and moves its id atomically
(BLMOVE) from the queue into this listener's in-progress list, so an id is never held only in
memory. A heartbeat thread keeps the listener markers and this worker's lease fresh whatever the
tasks do, and gives back the tasks of workers whose lease lapsed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import redis as redis_py

from .errors import RtqError, SerializationError, SignatureError
from .keys import check_name
from .recovery import Reaper
from .store import KEEP_S, EVENTS_MAXLEN, text
from .task import RedisTask, running

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

logger = logging.getLogger("rtq.worker")

LEASE = 10.0
"""Seconds a worker's heartbeat stays valid; a lapsed worker's tasks are requeued."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Listener:
    """Serves some queues of a :class:`RedisTaskQueue` with its ``task_fn``.

    Args:
        queue: The queue whose ``task_fn`` runs the tasks.
        names: Queue names to serve.
        workers: Tasks that may run at once.
        event: Stops the listener when set.
        lease: Seconds this worker's heartbeat stays valid.
        grace: On stop, seconds running tasks get to finish before they are requeued
            (None: wait for them).
        info: Extra fields announced in this worker's heartbeat record.
    """

    def __init__(
        self,
        queue: RedisTaskQueue,
        names: list[str],
        *,
        workers: int = 128,
        event: threading.Event | None = None,
        lease: float = LEASE,
        grace: float | None = None,
        info: dict[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> None:
        if not names:
            raise ValueError("listen() needs at least one queue name")
        for name in names:  # all of them before any marker is written
            check_name("queue name", name)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        self.queue = queue
        self.names = names
        self.workers = workers
        self.event = event or threading.Event()
        self.lease = lease
        self.grace = grace
        self.id = worker_id or new_worker_id()
        self.keys = queue.keys
        self.store = queue.store
        self.redis = queue.store.redis
        self.running_key = self.keys.running(self.id)
        self.info = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": names,
            "workers": workers,
            "started": time.time(),
            **(info or {}),
        }
        self.free = threading.Semaphore(workers)
        self.active: dict[str, RedisTask] = {}
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.reaper = Reaper(queue)
        self.stopped = threading.Event()
        self.tasks_done = 0

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until the stop event is set, then let running tasks end (or requeue them)."""
        for name in self.names:
            self.queue.set_queue_listened(name)
        self.beat()
        beat = threading.Thread(target=self._beat_loop, name=f"rtq-heartbeat-{self.id}", daemon=True)
        beat.start()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rtq-task")
        claimers = [
            threading.Thread(target=self._claim_loop, args=(name, pool), name=f"rtq-claim-{name}", daemon=True)
            for name in self.names
        ]
        for thread in claimers:
            thread.start()
        logger.info("worker %s listening on %s with %d slots", self.id, ", ".join(self.names), self.workers)
        try:
            self.event.wait()
        finally:
            self.event.set()
            for thread in claimers:
                thread.join()
            self._drain(pool)
            self.stopped.set()
            beat.join()
            self._retire()

    def stop(self) -> None:
        self.event.set()

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        with self.idle:
            finished = self.idle.wait_for(lambda: not self.active, timeout=self.grace)
            ids = list(self.active)
        if not finished:
            logger.warning("grace period over: requeueing %d running task(s): %s", len(ids), ", ".join(ids))
            self.reaper.give_back(self.id, refund=True)
        pool.shutdown(wait=finished, cancel_futures=True)

    def _retire(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self.keys.worker(self.id))
            pipe.zrem(self.keys.workers(), self.id)
            # Auto must stop routing here now; other listeners of these queues re-mark them
            # within their next heartbeat.
            pipe.delete(*(self.keys.listen(name) for name in self.names))
            pipe.execute()
        except redis_py.RedisError:
            logger.warning("could not remove worker record %s", self.id)

    # -- heartbeat -------------------------------------------------------------------------
    def beat(self) -> None:
        """Refresh this worker's lease and record, and the listener markers."""
        now = time.time()
        with self.lock:
            running_ids = list(self.active)
        record = json.dumps({**self.info, "beat": now, "running": running_ids, "done": self.tasks_done})
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(self.id), record, px=int(self.lease * 1000))
        pipe.zadd(self.keys.workers(), {self.id: now + self.lease})
        if not self.event.is_set():
            for name in self.names:
                pipe.set(self.keys.listen(name), "1", px=int(self.queue.timeout * 1000))
        pipe.execute()

    def _beat_loop(self) -> None:
        period = max(0.05, min(self.lease / 5, self.queue.interval, self.queue.timeout / 3))
        backoff = period
        while not self.stopped.wait(backoff):
            try:
                self.beat()
                self.reaper.reap(exclude=self.id)
                backoff = period
            except redis_py.RedisError as exc:
                backoff = min(backoff * 2, 5.0)
                logger.warning("heartbeat failed (%s); retrying in %.1fs", exc, backoff)

    # -- claiming --------------------------------------------------------------------------
    def _claim_loop(self, name: str, pool: ThreadPoolExecutor) -> None:
        queue_key = self.keys.queue(name)
        contended = self.workers < len(self.names)
        wait_cap = min(self.queue.interval, self.store.cap, 0.1 if contended else float("inf"))
        backoff = 0.0
        while not self.event.is_set():
            if not self.free.acquire(timeout=self.queue.interval):
                continue
            handed_over = False
            try:
                if backoff:
                    self.event.wait(backoff)
                    if self.event.is_set():
                        break
                task_id = self.redis.blmove(queue_key, self.running_key, max(0.01, wait_cap), "LEFT", "RIGHT")
                backoff = 0.0
                if task_id is None:
                    continue
                task = self._claim(text(task_id))
                if task is None:
                    continue
                with self.lock:
                    self.active[task.id] = task
                pool.submit(self._execute, task)
                handed_over = True
            except redis_py.RedisError as exc:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                logger.warning("cannot claim from %s (%s); retrying in %.1fs", name, exc, backoff)
            except Exception:  # hostile data must never end the claim loop: log, skip, go on
                logger.exception("skipped a task in %s that could not be claimed", name)
            finally:
                if not handed_over:
                    self.free.release()

    def _claim(self, task_id: str) -> RedisTask | None:
        key = self.keys.task(task_id)
        reply = self.store.scripts["claim"](
            keys=[key, self.running_key], args=[task_id, self.id, repr(time.time())]
        )
        if reply is None:
            logger.info("skipped task %s: expired, cancelled or gone", task_id)
            return None
        attempt, token, expiry, first, extra = reply
        task = RedisTask(id=task_id, name="", params=None, expiry=0.0)
        task._attempt = int(attempt)  # type: ignore[attr-defined]
        task._notify = self.keys.done(task_id)  # type: ignore[attr-defined]
        try:
            # Everything read here may have been written by anyone with access to the Redis:
            # a malformed field fails this task, never the claim loop.
            try:
                task.expiry = float(text(expiry))
                task._token = text(token)  # type: ignore[attr-defined]
                name, notify = self.redis.hmget(key, ["name", "notify"])
                task.name = text(name)
                task._notify = text(notify) or self.keys.done(task_id)  # type: ignore[attr-defined]
            except ValueError as exc:
                raise SerializationError(f"task {task_id} has malformed fields: {exc}") from exc
            task.params = self.store.decode(key, "params", first, extra or None)
        except (SerializationError, SignatureError) as exc:
            level = logging.ERROR if isinstance(exc, SignatureError) else logging.WARNING
            logger.log(level, "refused task %s in %s: %s", task_id, task.name, exc)
            self._finish(task, "failed", exc)
            self.reaper.dead_letter(task_id, task.name, exc)
            return None
        return task

    # -- running ---------------------------------------------------------------------------
    def _execute(self, task: RedisTask) -> None:
        attempt = str(task._attempt)  # type: ignore[attr-defined]
        progress = self.store.scripts["progress"]
        key, events = self.keys.task(task.id), self.keys.events(task.id)

        def report(t: RedisTask) -> str | None:
            state = progress(
                keys=[key, events],
                args=[
                    self.id,
                    attempt,
                    f"{t.current_progress!r} {t.total_progress!r} {t.update_progress_time!r}",
                    EVENTS_MAXLEN,
                    getattr(t, "_token", ""),
                ],
            )
            return text(state) if state is not None else "lost"

        task._report = report
        task._save = lambda: report(task) and None
        try:
            try:
                with running(task):
                    result = self.queue.task_fn(task)  # type: ignore[misc]
            except BaseException as exc:  # a task must never take its worker down
                self._finish(task, "failed", exc)
            else:
                self._finish(task, "done", result)
        except Exception:
            logger.exception("could not store the outcome of task %s", task.id)
        finally:
            with self.idle:
                self.active.pop(task.id, None)
                self.tasks_done += 1
                self.idle.notify_all()
            self.free.release()

    def _finish(self, task: RedisTask, state: str, value: Any) -> None:
        key = self.keys.task(task.id)
        attempt = str(task._attempt)  # type: ignore[attr-defined]
        tag = f"a{attempt}"
        if state == "done":
            try:
                fields = self.store.encode(key, "result", value, tag, "result")
            except SerializationError as exc:
                state, value = "failed", exc
        if state == "failed":
            fields = self.store.encode_error(key, value, tag)
        first, rest = _split_frames(fields, ("result", "error", "error_text"))
        if rest:  # big frames go in plain writes; their attempt tag keeps them fenced
            self.redis.hset(key, mapping=rest)
        stored = self.store.scripts["finish"](
            keys=[key, self.running_key, task._notify],  # type: ignore[attr-defined]
            args=[
                task.id,
                self.id,
                attempt,
                state,
                repr(time.time()),
                int(KEEP_S * 1000),
                getattr(task, "_token", ""),  # fences out a run of an earlier submission of this id
                *_flatten(first),
            ],
        )
        if not stored:
            logger.info("discarded the outcome of task %s: cancelled, expired or taken over", task.id)
        elif state == "failed":
            logger.info("task %s in %s failed: %s", task.id, task.name, _short(value))


def _split_frames(fields: dict[str, Any], small: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {k: v for k, v in fields.items() if k in small or k.endswith("#")}
    rest = {k: v for k, v in fields.items() if k not in first}
    return first, rest


def _flatten(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def _short(exc: BaseException) -> str:
    text_ = f"{type(exc).__name__}: {exc}"
    return text_ if len(text_) < 200 else text_[:197] + "..."


__all__ = ["Listener", "RtqError"]
