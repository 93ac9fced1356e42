"""The loop behind :meth:`RedisTaskQueue.listen`: claim, run, report, recover.

One claim thread per queue takes a task only while a slot is free, and moves its id atomically
(BLMOVE) from the queue into this listener's in-progress list, so an id is never held only in
memory. A heartbeat thread keeps the listener markers and this worker's lease fresh, gives back
the tasks of workers whose lease lapsed, and stops running tasks nobody wants any more
(:mod:`rtq.stopper`). Because a task holding the GIL freezes that thread too, a separate helper
process (:mod:`rtq.heartbeat`) keeps the lease and markers alive as well.
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

from .batching import GroupCommit
from .capture import capturing
from .errors import RtqError, SerializationError, SignatureError, TaskCancelled, TaskTimeout
from .fastpath import Channel, call_script
from .heartbeat import HeartbeatConfig, HeartbeatHelper, connection_settings
from .keys import check_name
from .recovery import Reaper
from .stopper import Stopper
from .store import EVENTS_MAXLEN, KEEP_S, text
from .task import RedisTask, running

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

logger = logging.getLogger("rtq.worker")

LEASE = 10.0
"""Seconds a worker's heartbeat stays valid; a lapsed worker's tasks are requeued."""
CLAIM_BATCH = 32
"""Most tasks one claim round takes at once (never more than the worker's free slots)."""


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
        heartbeat_process: Also keep the lease alive from a helper process, which a task holding
            the GIL cannot starve (see :mod:`rtq.heartbeat`).
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
        heartbeat_process: bool = True,
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
        self.heartbeat_process = heartbeat_process
        self.helper: HeartbeatHelper | None = None
        self.claiming: set[str] = set()  # ids moved into our list, not yet in ``active``
        self.finisher = GroupCommit(self.redis)  # finish.lua calls of tasks ending together
        self.suspects: dict[str, float] = {}  # ids in our list we do not hold, and since when
        self.abandoned: list[str] = []  # tasks still running after shutdown requeued them
        # Test hook: pause right after BLMOVE, before claim.lua, writing the id to this file.
        self.pause_after_move = os.environ.get("RTQ_TEST_PAUSE_AFTER_MOVE")

    @property
    def period(self) -> float:
        """Seconds between heartbeats: several per lease and several per marker lifetime."""
        return max(0.05, min(self.lease / 5, self.queue.interval, self.queue.timeout / 3))

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until the stop event is set, then let running tasks end (or requeue them)."""
        for name in self.names:
            self.queue.set_queue_listened(name)
        self.beat()
        self._start_helper()
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
            try:
                if self.helper is not None:
                    self.helper.drain()
                for thread in claimers:
                    thread.join()
                self._drain(pool)
                self.stopped.set()
                beat.join()
            finally:
                if self.helper is not None:
                    self.helper.close()
                self._retire()

    def stop(self) -> None:
        self.event.set()

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        with self.idle:
            finished = self.idle.wait_for(lambda: not self.active, timeout=self.grace)
            ids = list(self.active)
        if not finished:
            logger.warning("grace period over: requeueing %d running task(s): %s", len(ids), ", ".join(ids))
            try:
                self.reaper.give_back(self.id, refund=True)
            except redis_py.RedisError as exc:  # they stay in our list: any worker requeues them
                logger.warning("could not requeue %s (%s); they return when this lease lapses", ids, exc)
            with self.idle:
                for task in self.active.values():
                    _stopper(task).stop(TaskCancelled, "was requeued: its worker shut down")
                # A task inside a long C call cannot be stopped; the caller exits without it.
                if not self.idle.wait_for(lambda: not self.active, timeout=max(1.0, self.period)):
                    self.abandoned = list(self.active)
        pool.shutdown(wait=finished, cancel_futures=True)

    def _start_helper(self) -> None:
        if not self.heartbeat_process:
            return
        connection_class, connection_kwargs = connection_settings(self.redis)
        config = HeartbeatConfig(
            connection_class=connection_class,
            connection_kwargs=connection_kwargs,
            prefix=self.keys.prefix,
            suffix=self.keys.suffix,
            worker_id=self.id,
            names=list(self.names),
            lease=self.lease,
            marker_ttl=self.queue.timeout,
            period=self.period,
            parent_pid=os.getpid(),
            record=dict(self.info),
        )
        self.helper = HeartbeatHelper(config)
        if self.helper.start():
            self.info["heartbeat_pid"] = self.helper.pid

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
        record = json.dumps(
            {**self.info, "beat": now, "running": running_ids, "done": self.tasks_done, "stopping": self.event.is_set()}
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(self.id), record, px=int(self.lease * 1000))
        pipe.zadd(self.keys.workers(), {self.id: now + self.lease})
        if not self.event.is_set():
            for name in self.names:
                pipe.set(self.keys.listen(name), "1", px=int(self.queue.timeout * 1000))
        pipe.execute()

    def _beat_loop(self) -> None:
        period = self.period
        # Never back off past a third of the lease: once Redis is back, the lease must be too.
        longest = max(period, min(5.0, self.lease / 3))
        backoff = period
        failing = False
        while not self.stopped.wait(backoff):
            if self.helper is not None:
                self.helper.ensure()
            try:
                self.beat()
                self.reaper.reap(exclude=self.id)
                self._watch()
                self._audit()
            except redis_py.RedisError as exc:
                backoff = min(backoff * 2, longest)
                # Once per outage: a Redis restart must not flood the worker's log.
                logger.log(logging.DEBUG if failing else logging.WARNING, "heartbeat failed (%s); retrying", exc)
                failing = True
                continue
            if failing:
                logger.warning("heartbeat restored")
            failing, backoff = False, period

    def _watch(self) -> None:
        """Stop running tasks nobody wants any more: cancelled, taken over, vanished or expired.

        A task that calls ``update()`` learns it there; this reaches the ones that never do
        (see :mod:`rtq.stopper` for what it can and cannot interrupt).
        """
        with self.lock:
            tasks = list(self.active.values())
        if not tasks:
            return
        pipe = self.redis.pipeline(transaction=False)
        for task in tasks:
            pipe.hmget(self.keys.task(task.id), ["state", "owner", "attempt", "token"])
        now = time.time()
        for task, (state, owner, attempt, token) in zip(tasks, pipe.execute(), strict=True):
            if _stopper(task).finished:
                continue  # it ended by itself; its record may already be stored or read and gone
            exc_type: type[BaseException] = TaskCancelled
            mine = text(owner) == self.id and text(attempt) == str(task._attempt)  # type: ignore[attr-defined]
            if getattr(task, "_token", "") and token is not None and text(token) != task._token:  # type: ignore[attr-defined]
                mine = False
            if state is None:
                reason = "lost its data in Redis (restart, eviction or flush)"
            elif text(state) == "cancelled":
                reason = "was cancelled"
            elif text(state) != "running" or not mine:
                reason = "was taken over by another worker"
            elif task.expiry < now:
                reason, exc_type = "ran past its deadline", TaskTimeout
            else:
                continue
            stopper = _stopper(task)
            if stopper.noticed is None:
                stopper.noticed = now
            window = max(1.0, 2 * self.period)
            if exc_type is TaskCancelled and now - task._reported_at < window and now - stopper.noticed < window:
                continue  # it calls update(), which raises at a point of its own choosing
            if not stopper.requested:
                logger.warning("stopping task %s in %s: it %s", task.id, task.name, reason)
                if state is None:  # wake its caller now, who then finds the data gone
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.rpush(task._notify, task.id)  # type: ignore[attr-defined]
                    pipe.pexpire(task._notify, int(KEEP_S * 1000))  # type: ignore[attr-defined]
                    pipe.execute()
            stopper.stop(exc_type, reason)

    def _audit(self) -> None:
        """Give back ids sitting in this worker's list that it does not hold.

        BLMOVE can move an id whose reply never arrives (a connection dropped mid-call, a Redis
        restart with persistence): the id would sit in a live worker's list forever. One seen
        there, unheld, for a whole lease goes back to its queue.
        """
        listed = {text(i) for i in self.redis.lrange(self.running_key, 0, -1)}
        with self.lock:
            held = set(self.active) | self.claiming
        now = time.monotonic()
        self.suspects = {i: self.suspects.get(i, now) for i in listed - held}
        due = [i for i, since in self.suspects.items() if now - since >= max(self.lease, 3 * self.period)]
        if due:
            logger.warning("giving back task(s) this worker lost track of: %s", ", ".join(due))
            self.reaper.give_back(self.id, refund=True, only=due)
            for task_id in due:
                self.suspects.pop(task_id, None)

    # -- claiming --------------------------------------------------------------------------
    def _claim_loop(self, name: str, pool: ThreadPoolExecutor) -> None:
        queue_key = self.keys.queue(name)
        contended = self.workers < len(self.names)
        wait_cap = min(self.queue.interval, self.store.cap, 0.1 if contended else float("inf"))
        channel = Channel(self.redis)  # this thread's own connection: BLMOVE and the claims
        try:
            self._claim_until_stopped(name, queue_key, wait_cap, pool, channel)
        finally:
            channel.close()

    def _claim_until_stopped(
        self, name: str, queue_key: str, wait_cap: float, pool: ThreadPoolExecutor, channel: Channel
    ) -> None:
        backoff = 0.0
        while not self.event.is_set():
            if not self.free.acquire(timeout=self.queue.interval):
                continue
            slots = 1  # free slots this iteration holds; each task handed to the pool takes one
            try:
                if self.event.is_set():  # stopped while waiting for a slot
                    break
                if backoff:
                    self.event.wait(backoff)
                    if self.event.is_set():
                        break
                moved = channel.execute("BLMOVE", queue_key, self.running_key, "LEFT", "RIGHT", max(0.01, wait_cap))
                backoff = 0.0
                if moved is None:
                    continue
                # More free slots: take more queued ids now, in the first claim's round trip.
                while slots < CLAIM_BATCH and self.free.acquire(blocking=False):
                    slots += 1
                for task in self._claim_batch(channel, queue_key, text(moved), slots - 1):
                    pool.submit(self._execute, task)
                    slots -= 1
            except redis_py.RedisError as exc:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                logger.warning("cannot claim from %s (%s); retrying in %.1fs", name, exc, backoff)
            except Exception:  # hostile data must never end the claim loop: log, skip, go on
                logger.exception("skipped a task in %s that could not be claimed", name)
                backoff = min(max(backoff * 2, 0.01), 5.0)  # never a hot loop, whatever the cause
            finally:
                for _ in range(slots):
                    self.free.release()

    def _claim_batch(self, channel: Channel, queue_key: str, task_id: str, more: int) -> list[RedisTask]:
        """Claim ``task_id`` (just moved into our list) and up to ``more`` ids still queued.

        Two round trips at most: claim.lua claims the first id and moves up to ``more`` others
        from the queue into our in-progress list (atomically, so no id is ever held only in
        memory), then those are claimed together in one pipeline. Returns the tasks now ours,
        in queue order.
        """
        moved = [task_id]
        with self.lock:
            self.claiming.add(task_id)
        try:
            if self.event.is_set():  # stopped during the blocking move: put it back
                self.reaper.give_back(self.id, refund=True, only=[task_id])
                return []
            if self.pause_after_move:
                self._pause_for_tests(task_id)
            claim = self.store.scripts["claim"]
            first, extra = call_script(
                channel, claim, [self.keys.task(task_id), self.running_key, queue_key],
                [task_id, self.id, repr(time.time()), more],
            )
            extra = [text(i) for i in extra]
            with self.lock:
                self.claiming.update(extra)
            moved += extra
            claims: list[tuple[str, Any]] = [(task_id, first)]
            if extra:
                now = repr(time.time())
                replies = channel.pipeline(
                    [("EVALSHA", claim.sha, 2, self.keys.task(i), self.running_key, i, self.id, now) for i in extra]
                )
                claims += zip(extra, (r if isinstance(r, Exception) else r[0] for r in replies))
            tasks = []
            for claimed_id, reply in claims:
                try:
                    if isinstance(reply, redis_py.exceptions.NoScriptError):  # Redis restarted or flushed
                        reply = self._claim_reply(claimed_id)  # loads the script; that claim never ran
                    if isinstance(reply, Exception):
                        raise reply
                    task = self._task_of_claim(claimed_id, reply)
                except Exception as exc:  # this id stays listed; the audit gives it back
                    logger.warning("could not claim task %s (%s)", claimed_id, exc)
                    continue
                if task is None:
                    continue
                task._stopper = Stopper()  # type: ignore[attr-defined]
                with self.lock:
                    self.active[task.id] = task
                tasks.append(task)
            return tasks
        finally:
            with self.lock:
                self.claiming.difference_update(moved)

    def _pause_for_tests(self, task_id: str) -> None:
        """Hold a moved-but-unclaimed id until stopped, so a test can kill the worker right here."""
        with open(self.pause_after_move, "a") as fh:  # type: ignore[arg-type]
            fh.write(f"{task_id}\n")
        self.event.wait()

    def _claim_reply(self, task_id: str) -> Any:
        """claim.lua's claim of one id already in our list (one round trip)."""
        reply = self.store.scripts["claim"](
            keys=[self.keys.task(task_id), self.running_key], args=[task_id, self.id, repr(time.time())]
        )
        return reply[0]

    def _claim(self, task_id: str) -> RedisTask | None:
        """Claim one id already in our list; None when it must be skipped."""
        return self._task_of_claim(task_id, self._claim_reply(task_id))

    def _task_of_claim(self, task_id: str, reply: Any) -> RedisTask | None:
        """The task claim.lua handed over, or None when it was skipped or refused (then failed)."""
        key = self.keys.task(task_id)
        if not reply:
            logger.info("skipped task %s: expired, cancelled or gone", task_id)
            return None
        attempt, token, expiry, first, extra, name, notify = reply
        task = RedisTask(id=task_id, name="", params=None, expiry=0.0)
        task._attempt = int(attempt)  # type: ignore[attr-defined]
        task._notify = self.keys.done(task_id)  # type: ignore[attr-defined]
        try:
            # Everything read here may have been written by anyone with access to the Redis:
            # a malformed field fails this task, never the claim loop.
            try:
                task.expiry = float(text(expiry))
                task._token = text(token)  # type: ignore[attr-defined]
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

        stopper = _stopper(task)

        def report(t: RedisTask) -> str | None:
            try:
                # Shielded: a stop landing mid-call would leave a shared connection with an
                # unread reply; the state returned here stops the task just as well.
                with stopper.shielded():
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
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                # Redis away for a moment: the task goes on; its outcome is stored once it is back.
                logger.warning("could not report the progress of task %s (%s)", task.id, exc)
                return "running"
            return text(state) if state is not None else "lost"

        task._report = report
        task._save = lambda: report(task) and None
        try:
            try:
                # capturing() sends the task's last output on exit, before _finish stores the outcome
                with running(task), capturing(self.store, task, self.id), stopper.armed():
                    result = self.queue.task_fn(task)  # type: ignore[misc]
            except BaseException as exc:  # a task must never take its worker down
                if stopper.exc_type is not None and isinstance(exc, stopper.exc_type) and not str(exc):
                    exc = stopper.exc_type(f"Task {task.id} in {task.name} {stopper.reason}")  # raised bare
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
        # Redis away (restarting): keep the outcome and retry with backoff, rather than leave
        # the task running forever in a live worker's list.
        give_up = max(task.expiry, time.time() + 60)
        backoff = 0.1
        while True:
            try:
                stored = self._store_outcome(task, key, attempt, state, first, rest)
                break
            except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
                if time.time() + backoff > give_up:
                    raise
                logger.warning("cannot store the outcome of task %s (%s); retrying in %.1fs", task.id, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if not stored:
            logger.info("discarded the outcome of task %s: cancelled, expired or taken over", task.id)
        elif state == "failed":
            logger.info("task %s in %s failed: %s", task.id, task.name, _short(value))

    def _store_outcome(
        self, task: RedisTask, key: str, attempt: str, state: str, first: dict[str, Any], rest: dict[str, Any]
    ) -> bool:
        finish = self.store.scripts["finish"]
        keys = [key, self.running_key, task._notify, self.keys.events(task.id)]  # type: ignore[attr-defined]
        args = [
            task.id,
            self.id,
            attempt,
            state,
            repr(time.time()),
            int(KEEP_S * 1000),
            getattr(task, "_token", ""),  # fences out a run of an earlier submission of this id
            *_flatten(first),
        ]
        if not rest:
            # Tasks ending together share one round trip (a lone one is sent at once).
            return bool(self.finisher.call(finish, keys=keys, args=args))
        # Big frames go in a plain HSET (sent as they are, uncopied; their attempt tag keeps
        # them fenced), in the same write as finish.lua, which deletes the record again if it had
        # vanished (flush, restart) and the HSET re-created it with the frames alone.
        with self.store.channels.channel() as channel:
            frames, stored = channel.pipeline([("HSET", key, *_flatten(rest)), ("EVALSHA", finish.sha, len(keys), *keys, *args)])
            if isinstance(stored, redis_py.exceptions.NoScriptError):  # a restarted or flushed server
                stored = call_script(channel, finish, keys, args)
        for reply in (frames, stored):
            if isinstance(reply, Exception):
                raise reply
        return bool(stored)


def _stopper(task: RedisTask) -> Stopper:
    stopper: Stopper | None = getattr(task, "_stopper", None)
    if stopper is None:
        stopper = task._stopper = Stopper()  # type: ignore[attr-defined]
    return stopper


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
