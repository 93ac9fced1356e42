"""The client's wait path on a real server: many waiters, stray pushes, lost queue entries, clean-ups.

Every caller of one ``RedisTaskQueue`` (``query()``, ``Executor`` futures) is woken by the queue's
one collector (``rtq.collector``). These tests drive it with real ``rtq worker`` processes and
check what a user would notice: every call returns, none waits out its deadline for work that
Redis no longer holds, and a consumed task leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import redis

import rtq
import rtq.watch
from conftest import Workers, in_thread, wait_for
from rtq import RedisTaskQueue, TaskExecutePolicy
from rtq.backend.keys import Keys
from rtq.errors import RtqConnectionError, TaskLost
from rtq.server import EmbeddedServer

K = Keys("test", "task-queue")
REMOTE = TaskExecutePolicy.Remote


def make_queue(client: redis.Redis, **kwargs: Any) -> RedisTaskQueue:
    from taskfns import echo_task

    return RedisTaskQueue(client, "test", **{"timeout": 60, "interval": 0.5, "task_fn": echo_task, **kwargs})


def connections(r: redis.Redis, name: str) -> int:
    """How many connections the clients named ``name`` hold open on the server now."""
    return sum(1 for c in r.client_list() if c.get("name") == name)


@pytest.mark.timeout(240)
def test_a_thousand_concurrent_queries_on_one_client_all_succeed(redis_url, r, workers, tmp_path):
    workers.start("q", args=("--workers", "8"))
    workers.start("q", args=("--workers", "8"))
    client = redis.Redis.from_url(redis_url, client_name="waiters")
    q = make_queue(client)
    release = tmp_path / "release"
    results: dict[int, Any] = {}

    def call(i: int) -> None:
        params = {"action": "until_file", "path": str(release), "value": i}
        try:
            results[i] = q.query(f"many-{i}", "q", params, policy=REMOTE)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(1000)]
    for t in threads:
        t.start()
    # Every call submitted and waiting at once: 16 run (and hold), the rest are queued.
    wait_for(lambda: r.llen(K.queue("q")) + len(results) >= 1000 - 16, 120, "all 1000 calls to be waiting")
    waiting = connections(r, "waiters")
    release.touch()
    for t in threads:
        t.join(120)
    failures = {i: v for i, v in results.items() if v != i}
    assert len(results) == 1000 and not failures, f"{len(failures)} failed, e.g. {list(failures.items())[:3]}"
    # The waiters share one blocking read: a handful of connections, not one per waiter.
    assert waiting <= 10, f"{waiting} connections held by 1000 waiting calls"


def _checkout(pool: Any) -> Any:
    try:
        return pool.get_connection()  # redis-py >= 5.3
    except TypeError:
        return pool.get_connection("_")  # redis-py 5.0-5.2 require a command name (unused)


def test_an_exhausted_connection_pool_is_named_as_such(redis_url, r):
    client = redis.Redis.from_url(redis_url, max_connections=2)
    q = make_queue(client)
    held = [_checkout(client.connection_pool) for _ in range(2)]
    try:
        with pytest.raises(RtqConnectionError) as info:
            q.query("pool", "q", {"action": "echo", "value": 1}, policy=REMOTE, timeout=5)
    finally:
        for conn in held:
            client.connection_pool.release(conn)
    message = str(info.value)
    assert "connection pool is exhausted" in message and "2 connections" in message, message
    assert "max_connections" in message and "unreachable" not in message, message


def test_a_stray_id_in_the_inbox_does_not_orphan_its_future(r, workers):
    q = make_queue(r, timeout=30)
    ex = rtq.Executor(q, "stray", check_versions=False)
    fut = ex.submit(sum, [1, 2])
    r.rpush(ex.inbox, fut.task_id)  # an early push, while the task is still queued
    wait_for(lambda: r.llen(ex.inbox) == 0, 10, "the collector to take the stray id")
    assert not fut.done()
    workers.start("stray", task_fn=None)
    assert fut.result(timeout=20) == 3


def test_a_stray_push_on_a_query_done_list_keeps_the_caller_waiting(r, workers, tmp_path):
    q = make_queue(r)
    release = tmp_path / "release"
    box: dict[str, Any] = {}
    task = q.build_task("early", "q", {"action": "until_file", "path": str(release), "value": "ran"})
    q.submit(task)
    thread = threading.Thread(target=lambda: box.update(value=q.wait(task)), daemon=True)
    thread.start()
    r.rpush(K.done("early"), "early")  # a push while nothing ran yet
    wait_for(lambda: r.llen(K.done("early")) == 0, 10, "the collector to take the stray push")
    assert thread.is_alive() and not box
    workers.start("q")
    release.touch()
    thread.join(20)
    assert box == {"value": "ran"}


def test_a_query_whose_queue_entry_vanished_gets_task_lost_within_seconds(r):
    q = make_queue(r)
    box = in_thread(lambda: q.query("evicted", "nobody", {"action": "echo"}, timeout=60, policy=REMOTE))
    wait_for(lambda: r.lrange(K.queue("nobody"), 0, -1) == [b"evicted"], 10, "the task to be queued")
    r.delete(K.queue("nobody"))  # as an eviction would: the record stays 'queued'
    gone = time.monotonic()
    box["thread"].join(30)
    assert isinstance(box.get("error"), TaskLost), box
    # within seconds: well before its 60 s deadline (the bound leaves room for a loaded machine)
    assert box["at"] - gone < 30, f"TaskLost came {box['at'] - gone:.1f}s after the entry vanished"
    assert "no queue and no worker's list" in str(box["error"])


def test_a_future_whose_queue_entry_vanished_gets_task_lost_within_seconds(r):
    q = make_queue(r)
    ex = rtq.Executor(q, "nobody", check_versions=False)
    fut = ex.submit(sum, [1])
    wait_for(lambda: r.llen(K.queue("nobody")) == 1, 10, "the task to be queued")
    r.lrem(K.queue("nobody"), 0, fut.task_id)
    gone = time.monotonic()
    assert isinstance(fut.exception(timeout=40), TaskLost)
    assert time.monotonic() - gone < 30  # well before its 60 s deadline


def test_a_queued_task_waiting_long_in_a_queue_is_not_declared_lost(r):
    q = make_queue(r, timeout=8)
    box = in_thread(lambda: q.query("patient", "later", {"action": "echo", "value": 5}, timeout=8, policy=REMOTE))
    box["thread"].join(12)  # several checks pass while it sits in its queue: it times out, never 'lost'
    assert type(box.get("error")).__name__ == "TaskTimeout", box
    assert "ran past its 8 s timeout" in str(box["error"])


def test_a_running_task_on_a_stopped_worker_whose_list_vanished_gets_task_lost(r, workers, tmp_path):
    q = make_queue(r)
    release = tmp_path / "release"
    proc = workers.start("q", args=("--lease", "1.5"))
    box = in_thread(lambda: q.query("held", "q", {"action": "until_file", "path": str(release)}, policy=REMOTE))
    wait_for(lambda: r.hget(K.task("held"), "state") == b"running", 10, "the task to run")
    os.kill(proc.pid, signal.SIGSTOP)  # its lease lapses; its list would be reaped...
    try:
        running = [k for k in r.scan_iter(match=K.running("*"))]
        r.delete(*running)  # ...but an eviction took it first
        gone = time.monotonic()
        box["thread"].join(30)
        assert isinstance(box.get("error"), TaskLost), box
        assert box["at"] - gone < 30  # well before its 60 s deadline
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.timeout(180)
def test_evictions_under_allkeys_lru_never_leave_a_caller_waiting_out_its_deadline(tmp_path):
    """20 small and 40 x 3 MB tasks into a 50 MB server under allkeys-lru (the field report)."""
    numpy = pytest.importorskip("numpy")
    with EmbeddedServer(args=("--maxmemory", "50mb", "--maxmemory-policy", "allkeys-lru")) as server:
        pool = Workers(server.url)
        client = redis.Redis.from_url(server.url)
        try:
            pool.start("ev", task_fn=None, args=("--lease", "2", "--workers", "2"))
            q = RedisTaskQueue(client, "test", timeout=40, interval=0.5)
            ex = rtq.Executor(q, "ev", check_versions=False)
            futures = [ex.submit(len, b"x" * 100) for _ in range(20)]
            futures += [ex.submit(numpy.ndarray.sum, numpy.ones(3 * 2**20 // 8)) for _ in range(40)]
            started = time.monotonic()
            outcomes = []
            for fut in futures:
                try:
                    outcomes.append(fut.result(timeout=40))
                except (TaskLost, rtq.errors.TaskTimeout, rtq.errors.SerializationError) as exc:
                    outcomes.append(exc)
            took = time.monotonic() - started
            timeouts = [o for o in outcomes if isinstance(o, rtq.errors.TaskTimeout)]
            assert not timeouts, f"{len(timeouts)} callers waited out their deadline"
            assert took < 30, f"the last caller learnt its fate after {took:.0f}s"
        finally:
            pool.kill_all()
            client.close()


def test_consumed_no_op_tasks_leave_nothing_in_redis(r, workers):
    workers.start("noop", task_fn=None)
    q = make_queue(r)
    with rtq.Executor(q, "noop", check_versions=False) as ex:
        assert list(ex.map(abs, range(-100, 0))) == list(range(100, 0, -1))
    kinds = ("task-result:", "task-events:", "task-done:", "task-queue|", "inbox:")

    def leftovers() -> list[str]:
        return [k for k in (k.decode()[len(K.head) :] for k in r.scan_iter(match=f"{K.head}*")) if k.startswith(kinds)]

    wait_for(lambda: not leftovers(), 10, "consumed tasks' records and event streams to go")


def test_a_consumed_task_with_output_stays_watchable_for_a_while(r, workers):
    workers.start("talk", task_fn=None)
    q = make_queue(r)
    ex = rtq.Executor(q, "talk", check_versions=False)
    fut = ex.submit(print, "hello from the worker")
    fut.result(timeout=20)
    seen: list[str] = []
    assert rtq.watch.watch(fut, on_output=lambda stream, text: seen.append(text), timeout=10) == "done"
    assert "hello from the worker" in "".join(seen)
    # Its clean-up rides the client's next wake-up, or runs within a second when none comes:
    # the events then stay readable for 10 s, not for the record's whole retention.
    wait_for(lambda: 0 < r.pttl(K.events(fut.task_id)) <= 10_000, 10, "the events to be kept 10 s at most")
    assert not r.exists(K.task(fut.task_id))


@pytest.mark.timeout(240)
def test_results_awaited_in_many_threads_and_by_callbacks_all_arrive(r, workers):
    # A result() collects in its own thread while nobody else does; the others are settled by
    # it, or by the collector thread once it stops. No future may be stranded between them.
    workers.start("q", task_fn=None, args=("--workers", "4"))
    q = make_queue(r, task_fn=None)
    with rtq.Executor(q, "q", check_versions=False) as ex:
        called: list[int] = []
        for i in range(50):  # nobody calls result() on these: their callbacks alone
            ex.submit(abs, -i).add_done_callback(lambda f: called.append(f.result()))

        def loop(k: int) -> list[int]:
            return [ex.submit(abs, -(k * 100 + i)).result(60) for i in range(25)]

        boxes = [in_thread(lambda k=k: loop(k)) for k in range(6)]
        for box in boxes:
            box["thread"].join(180)
        assert [box.get("value", box.get("error")) for box in boxes] == [
            [k * 100 + i for i in range(25)] for k in range(6)
        ]
        wait_for(lambda: len(called) == 50, 60, "every callback to run")
        assert sorted(called) == list(range(50))


def test_a_consumed_call_is_gone_once_the_next_call_returns(r, workers):
    workers.start("q", task_fn=None)
    q = make_queue(r, task_fn=None)
    with rtq.Executor(q, "q", check_versions=False) as ex:
        first = ex.submit(abs, -1)
        assert first.result(30) == 1
        assert ex.submit(abs, -2).result(30) == 2  # its wake-up carried the first one's clean-up
        assert not r.exists(K.task(first.task_id)) and not r.exists(K.done(first.task_id))
