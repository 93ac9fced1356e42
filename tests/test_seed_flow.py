"""The seed's own flow and its override points, on a real Redis with real listeners.

The seed describes ``listen()`` as running what it takes *locally* — through
``execute_task_locally`` — and ``query()`` as dispatching through ``execute_task_locally`` /
``execute_task_remotely`` by policy; a submission is a stored task whose id is pushed on the
queue's list. A subclass that overrides either step must see every task that passes there.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from conftest import wait_for
from rtq import RedisTask, RedisTaskQueue, TaskExecutePolicy
from taskfns import Boom, echo_task

P = TaskExecutePolicy
HEAD = "test|task-queue|"


def local_pid(task: RedisTask) -> Any:
    return ("local", os.getpid())


def local_raises(task: RedisTask) -> Any:
    raise RuntimeError("no GPU here")


class Seen(RedisTaskQueue):
    """Records the ids that pass through each override point (the way a user adds logging or a timer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.local: list[str] = []
        self.remote: list[str] = []
        self.raised: list[str] = []

    def execute_task_locally(self, task: RedisTask, timeout: float | None = None) -> Any:
        with self.lock:
            self.local.append(task.id)
        try:
            return super().execute_task_locally(task, timeout)
        except Exception as exc:  # an override that logs failures: it sees the task's own error
            with self.lock:
                self.raised.append(f"{task.id}:{type(exc).__name__}")
            raise

    def execute_task_remotely(self, task: RedisTask, timeout: float | None = None, once: bool = False) -> Any:
        with self.lock:
            self.remote.append(task.id)
        try:
            return super().execute_task_remotely(task, timeout, once)
        except Exception as exc:
            with self.lock:
                self.raised.append(f"{task.id}:{type(exc).__name__}")
            raise


@pytest.fixture
def listening(redis_url: str, r: redis.Redis) -> Iterator[Any]:
    """Starts ``queue.listen()`` in a thread of the test process; stops and joins it at the end."""
    started: list[tuple[threading.Event, threading.Thread]] = []

    def start(queue: RedisTaskQueue, names: list[str]) -> None:
        event = threading.Event()
        thread = threading.Thread(target=queue.listen, args=(names, 4, event), daemon=True)
        thread.start()
        started.append((event, thread))
        wait_for(lambda: all(queue.is_listened(n) for n in names), 30, "the listener to mark its queues")

    yield start
    for event, _ in started:
        event.set()
    for _, thread in started:
        thread.join(30)
    assert not any(t.is_alive() for _, t in started), "listen() did not return after its event was set"


# -- listen() runs every task through execute_task_locally ------------------------------------


def test_listen_runs_every_task_through_execute_task_locally(r, listening):
    served = Seen(r, "test", timeout=30, interval=0.5, task_fn=echo_task)
    listening(served, ["q"])
    caller = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    for i in range(3):
        assert caller.query(f"s{i}", "q", {"action": "echo", "value": i}, policy=P.Remote) == i
    with pytest.raises(Boom, match="broke"):
        caller.query("s-fail", "q", {"action": "raise", "message": "broke"}, policy=P.Remote)
    assert sorted(served.local) == ["s-fail", "s0", "s1", "s2"]
    assert served.raised == ["s-fail:Boom"]
    # The outcome was stored once, by the worker, fenced by its claim: the record says who ran it.
    record = r.hgetall(f"{HEAD}task-result:s1")
    assert record[b"state"] == b"done" and record[b"owner"] and b"finished" in record


def test_listen_serves_a_subclass_whose_execute_task_locally_needs_no_task_fn(r, listening):
    class Doubler(RedisTaskQueue):
        def execute_task_locally(self, task: RedisTask, timeout: float | None = None) -> Any:
            return task.params * 2

    listening(Doubler(r, "test", timeout=30, interval=0.5), ["q"])
    caller = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    assert caller.query("d1", "q", 21, policy=P.Remote) == 42


def test_listen_without_task_fn_or_override_says_so(r):
    with pytest.raises(ValueError, match="task_fn"):
        RedisTaskQueue(r, "test").listen(["q"])


# -- query() sends every remote leg through execute_task_remotely -----------------------------


@pytest.mark.parametrize("policy", [P.Remote, P.Auto, P.LocalFirst, P.RemoteFirst])
def test_query_sends_its_remote_leg_through_execute_task_remotely(r, workers, policy):
    proc = workers.start("q")
    q = Seen(r, "test", timeout=30, interval=0.5, task_fn=local_raises)  # LocalFirst: the local try fails
    assert q.query("e1", "q", {"action": "pid"}, policy=policy) == proc.pid
    assert q.remote == ["e1"]


def test_auto_with_nobody_listening_runs_locally_after_the_remote_step_queued_nothing(r, workers):
    workers.start("other")
    q = Seen(r, "test", timeout=30, interval=0.5, task_fn=local_pid)
    assert q.query("n1", "q", {"action": "pid"}) == ("local", os.getpid())
    assert q.remote == ["n1"] and q.local == ["n1"]
    assert q.raised == []  # the override's `except Exception` never saw the hand-back
    assert r.llen(f"{HEAD}task-queue|q") == 0
    assert r.hget(f"{HEAD}task-result:n1", "state") == b"done"


def test_an_override_that_transforms_the_remote_result_keeps_working_under_auto(r, workers):
    class Wrapped(RedisTaskQueue):
        def execute_task_remotely(self, task: RedisTask, timeout: float | None = None, once: bool = False) -> Any:
            return ("remote", super().execute_task_remotely(task, timeout, once))

    q = Wrapped(r, "test", timeout=30, interval=0.5, task_fn=local_pid)
    assert q.query("w1", "q", {"action": "echo", "value": 1}) == ("local", os.getpid())  # nobody listens
    workers.start("q")
    assert q.query("w2", "q", {"action": "echo", "value": 2}) == ("remote", 2)


# -- the seed's submission: set_task, then push the id ----------------------------------------


def test_a_task_stored_with_set_task_and_pushed_runs_on_a_listener(r, workers):
    workers.start("q")
    q = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    task = q.build_task("seed1", "q", {"action": "echo", "value": "from the seed"})
    q.set_task(task)
    r.rpush(f"{HEAD}task-queue|q", "seed1")
    got = wait_for(lambda: (t := q.get_task("seed1")) is not None and t.result is not None and t, 30, "the result")
    assert got.result == "from the seed"
    assert r.llen(f"{HEAD}task-dead") == 0


def test_a_failing_seed_submission_keeps_its_error(r, workers):
    workers.start("q")
    q = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    q.set_task(q.build_task("seed2", "q", {"action": "raise", "message": "seed broke"}))
    r.rpush(f"{HEAD}task-queue|q", "seed2")
    got = wait_for(lambda: (t := q.get_task("seed2")) is not None and t.error is not None and t, 30, "the error")
    assert isinstance(got.error, Boom) and "seed broke" in str(got.error)


def test_progress_saved_during_a_local_run_does_not_make_the_task_look_queued(r):
    states: list[bytes | None] = []

    def reports(task: RedisTask) -> str:
        task.save()
        states.append(r.hget(f"{HEAD}task-result:{task.id}", "state"))
        return "ok"

    q = RedisTaskQueue(r, "test", timeout=30, interval=0.5, task_fn=reports)
    assert q.query("l1", "q", None, policy=P.Local) == "ok"
    assert states == [b"running"]


# -- entries that cannot be claimed are dead-lettered, with the reason, and logged once --------


def dead_letters(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(e) for e in r.lrange(f"{HEAD}task-dead", 0, -1)]


def stop_and_read(proc: Any) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return str(out)


def test_an_entry_without_data_is_dead_lettered_with_the_reason(r, workers):
    proc = workers.start("q")
    r.rpush(f"{HEAD}task-queue|q", "ghost")
    entries = wait_for(lambda: dead_letters(r), 30, "a dead-letter entry")
    assert [(e["id"], e["queue"]) for e in entries] == [("ghost", "q")]
    assert "could not be claimed" in entries[0]["error"] and "data is gone" in entries[0]["error"]
    assert r.llen(f"{HEAD}task-queue|q") == 0
    log = stop_and_read(proc)
    assert log.count("dropped task ghost from queue q") == 1, log


def test_a_second_entry_of_a_finished_task_is_dead_lettered_not_run_again(r, workers):
    proc = workers.start("q")
    q = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    assert q.query("twice", "q", {"action": "pid"}, policy=P.Remote) == proc.pid
    r.rpush(f"{HEAD}task-queue|q", "twice")
    entries = wait_for(lambda: dead_letters(r), 30, "a dead-letter entry")
    assert entries[0]["id"] == "twice" and "already ended (done)" in entries[0]["error"]
    assert q.get_task("twice").result == proc.pid  # the outcome stands
    assert "dropped task twice from queue q" in stop_and_read(proc)


def test_a_cancelled_task_is_skipped_without_a_dead_letter(r, workers):
    q = RedisTaskQueue(r, "test", timeout=30, interval=0.5)
    task = q.build_task("c1", "q", {"action": "echo", "value": 1})
    q.submit(task)
    assert q.cancel("c1") == "queued"
    r.rpush(f"{HEAD}task-queue|q", "c1", "marker")  # a stale entry of the cancelled task, then a sign-post
    workers.start("q")
    entries = wait_for(lambda: dead_letters(r), 30, "the sign-post's dead-letter entry")
    assert [e["id"] for e in entries] == ["marker"]
