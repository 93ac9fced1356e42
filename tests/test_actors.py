"""Actors (``rtq.Executor.actor``) and the failure semantics sessions share, against real workers.

Each test starts ``rtq worker`` subprocesses serving shipped calls; the actor classes are defined
here, inside the tests, so they travel by value as a notebook's would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

import rtq
from conftest import Workers, wait_for
from rtq.errors import SessionLost, SessionRefused
from rtq.task_queue import RedisTaskQueue

pytestmark = pytest.mark.timeout(90)

LEASE = 2.0


def _executor(r: redis.Redis, name: str = "act") -> rtq.Executor:
    return rtq.Executor(RedisTaskQueue(r, "test", timeout=60, interval=0.5), name)


def _start(workers: Workers, *args: str, name: str = "act") -> int:
    proc = workers.start(name, task_fn=None, args=("--lease", str(LEASE), *args))
    return proc.pid


class Counter:
    """Counts, and says what each call saw before it."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def add(self, k: int = 1) -> tuple[int, int]:
        before = self.n
        time.sleep(0.001)  # a switch in the middle: two calls at once would lose an update
        self.n = before + k
        return before, self.n

    def pid(self) -> int:
        return os.getpid()

    def fail(self) -> None:
        self.n = -1000  # a method that raises after changing state: the change stays, as in Python
        raise KeyError("no such thing")

    def value(self) -> int:
        return self.n


class Slow:
    def run(self, marker: str, seconds: float) -> str:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.01)
        return "finished"


def test_calls_run_one_at_a_time_in_order_from_four_threads(r: redis.Redis, workers: Workers) -> None:
    _start(workers)
    ex = _executor(r)
    counter = ex.actor(Counter)
    futures: list[rtq.TaskFuture] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(25):
            with lock:  # the order the calls were made in is the order they are queued in
                futures.append(counter.add())

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(60) for f in futures]
    assert counter.value().result(30) == 100
    # Each call saw exactly its predecessor's state: run one at a time, in the order made.
    assert results == [(i, i + 1) for i in range(100)]
    counter.close()


def test_state_stays_in_one_worker_process(r: redis.Redis, workers: Workers) -> None:
    pid = _start(workers)
    ex = _executor(r)
    with ex.actor(Counter, 41) as counter:
        assert {counter.pid().result(30) for _ in range(5)} == {pid}
        assert counter.add().result(30) == (41, 42)
        # Its futures are real futures: asyncio can await them.
        assert asyncio.run(_awaited(counter)) == (42, 43)
        assert "Counter" in repr(counter) and counter.session.worker in repr(counter)


async def _awaited(counter: rtq.Actor) -> object:
    return await asyncio.wrap_future(counter.add())


def test_a_method_that_raises_keeps_the_actor(r: redis.Redis, workers: Workers) -> None:
    _start(workers)
    ex = _executor(r)
    counter = ex.actor(Counter, 5)
    with pytest.raises(KeyError, match="no such thing"):
        counter.fail().result(30)
    assert counter.value().result(30) == -1000  # same instance, still there
    assert counter.add(1000).result(30) == (-1000, 0)
    counter.close()


def test_two_actors_on_two_workers(r: redis.Redis, workers: Workers) -> None:
    pids = {_start(workers, "--sessions", "1"), _start(workers, "--sessions", "1")}
    ex = _executor(r)
    wait_for(lambda: len(ex.queue.live_workers()) == 2, 15, "both workers to announce themselves")
    a, b = ex.actor(Counter), ex.actor(Counter)
    pid_a, pid_b = a.pid().result(30), b.pid().result(30)
    assert {pid_a, pid_b} == pids  # one each: the caller picked the worker with room
    for _ in range(10):
        a.add(), b.add(10)
    assert [a.pid().result(30) for _ in range(3)] == [pid_a] * 3
    assert [b.pid().result(30) for _ in range(3)] == [pid_b] * 3
    assert (a.value().result(30), b.value().result(30)) == (10, 100)
    # Both workers full: a third is refused, naming the limit.
    with pytest.raises(SessionRefused, match="--sessions"):
        ex.actor(Counter)
    a.close()
    b.close()


def test_a_worker_refuses_more_sessions_than_its_limit(r: redis.Redis, workers: Workers) -> None:
    _start(workers, "--sessions", "1")
    ex = _executor(r)
    first = ex.actor(Counter)
    with pytest.raises(SessionRefused, match=r"--sessions limit") as caught:
        ex.actor(Counter)
    assert "close" in str(caught.value)
    first.close()
    wait_for(lambda: _can_open(ex), 15, "the closed actor's place to be free")


def test_two_callers_racing_for_a_last_place_both_get_one_while_another_worker_has_room(
    r: redis.Redis, workers: Workers
) -> None:
    # Two workers with one place each, two callers opening at the same moment: each sees both
    # workers empty and picks one at random, so in about half the rounds both pick the same one.
    # The loser must open on the other worker, never get SessionRefused while it has room.
    pids = {_start(workers, "--sessions", "1", name="race") for _ in range(2)}
    ex = _executor(r, "race")
    wait_for(lambda: len(ex.queue.live_workers()) == 2, 15, "both workers to announce themselves")

    def caller(barrier: threading.Barrier, opened: list[rtq.Actor], failed: list[BaseException]) -> None:
        barrier.wait()
        try:
            opened.append(ex.actor(Counter))
        except BaseException as exc:
            failed.append(exc)

    for _ in range(8):
        barrier = threading.Barrier(2)
        opened: list[rtq.Actor] = []
        failed: list[BaseException] = []
        threads = [threading.Thread(target=caller, args=(barrier, opened, failed)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failed, failed
        assert {a.pid().result(30) for a in opened} == pids  # one on each worker
        for actor in opened:
            actor.close()
        wait_for(lambda: all(not w.get("sessions") for w in ex.queue.live_workers()), 15, "the places to be free")
    # Both full: a third caller is refused, and the refusal says so.
    a, b = ex.actor(Counter), ex.actor(Counter)
    with pytest.raises(SessionRefused, match="--sessions"):
        ex.actor(Counter)
    a.close()
    b.close()


def _can_open(ex: rtq.Executor) -> bool:
    try:
        ex.actor(Counter).close()
    except SessionRefused:
        return False
    return True


def test_killed_worker_ends_calls_with_session_lost_never_run_again(
    r: redis.Redis, workers: Workers, tmp_path: Path
) -> None:
    pid = _start(workers)
    ex = _executor(r)
    slow = ex.actor(Slow)
    worker = slow.session.worker
    marker = tmp_path / "started"
    running = slow.run(str(marker), 20)
    queued = slow.run(str(marker), 20)
    wait_for(marker.exists, 30, "the call to start")
    _start(workers)  # another worker that could take a requeued call: it must not
    wait_for(lambda: len(ex.queue.live_workers()) == 2, 15, "the second worker to announce itself")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(SessionLost) as caught:
        running.result(30)
    took = time.monotonic() - killed
    assert took <= LEASE + 2, took
    message = str(caught.value)
    assert worker in message and "died" in message and worker.split(":")[0] in message, message
    with pytest.raises(SessionLost, match="died"):
        queued.result(LEASE + 2)
    started = time.monotonic()
    with pytest.raises(SessionLost, match="died"):
        slow.run(str(marker), 1)  # the next call: refused at once, nothing queued
    assert time.monotonic() - started < 1.0
    assert not r.llen("test|task-queue|task-queue|act")  # nothing was requeued for another worker
    time.sleep(0.5)  # not synchronisation: a window in which a requeued call would have started
    assert marker.read_text().split() == [str(pid)], "a session call ran twice"


def test_sigterm_lets_the_running_call_finish_then_the_session_is_lost(
    r: redis.Redis, workers: Workers, tmp_path: Path
) -> None:
    pid = _start(workers, "--grace", "30")
    ex = _executor(r)
    slow = ex.actor(Slow)
    marker = tmp_path / "started"
    running = slow.run(str(marker), 1.5)
    queued = slow.run(str(marker), 1.5)
    wait_for(marker.exists, 30, "the call to start")
    os.kill(pid, signal.SIGTERM)
    assert running.result(30) == "finished"  # the running call had its grace
    with pytest.raises(SessionLost, match="worker stopped") as caught:
        queued.result(30)
    assert slow.session.worker in str(caught.value)
    with pytest.raises(SessionLost, match="worker stopped"):
        slow.run(str(marker), 1)
    assert marker.read_text().split() == [str(pid)]


def test_an_idle_actor_expires(r: redis.Redis, workers: Workers) -> None:
    _start(workers, "--session-idle", "1")
    ex = _executor(r)
    counter = ex.actor(Counter)
    assert counter.add().result(30) == (0, 1)
    record = ex.queue.keys.session(counter.session.id)
    wait_for(lambda: r.hget(record, "state") == b"closed", 15, "the idle session to close")
    with pytest.raises(SessionLost, match=r"idle expiry.*--session-idle"):
        counter.add()


def test_close_frees_it_and_later_calls_raise(r: redis.Redis, workers: Workers) -> None:
    _start(workers)
    ex = _executor(r)
    counter = ex.actor(Counter)
    pending = [counter.add() for _ in range(5)]
    counter.close()  # after the calls made before it
    assert [f.result(30) for f in pending][-1] == (4, 5)
    with pytest.raises(SessionLost, match=r"closed: actor.close\(\)"):
        counter.add()
    counter.close()  # closing twice is harmless
    with ex.actor(Counter) as other:
        other.add().result(30)
    with pytest.raises(SessionLost, match="closed"):
        other.add()


def test_a_closed_sessions_landing_list_is_forgotten(r: redis.Redis, workers: Workers) -> None:
    # Each session's thread claims its calls through a landing list of its own; a worker that
    # opens sessions all day must not keep the lists of those that closed.
    _start(workers)
    ex = _executor(r)
    keys = ex.queue.keys
    wait_for(lambda: r.zcard(keys.workers()) == 1, 15, "the worker's lease")
    worker = r.zrange(keys.workers(), 0, -1)[0].decode()
    lanes = keys.landings(worker)
    wait_for(lambda: r.scard(lanes) >= 2, 15, "the claim and session-opening threads' landing lists")
    before = r.smembers(lanes)
    counters = [ex.actor(Counter) for _ in range(3)]
    assert [c.add().result(30) for c in counters] == [(0, 1)] * 3
    assert len(r.smembers(lanes) - before) == 3
    for counter in counters:
        counter.close()
    wait_for(lambda: r.smembers(lanes) == before, 15, "the closed sessions' landing lists to be forgotten")


def test_bad_input(r: redis.Redis, workers: Workers) -> None:
    ex = _executor(r, "nobody")
    with pytest.raises(TypeError, match="needs a class"):
        ex.actor(Counter())  # type: ignore[arg-type]
    with pytest.raises(SessionRefused, match="no live worker serves queue 'nobody'"):
        ex.actor(Counter)
    _start(workers)
    counter = _executor(r).actor(Counter)
    with pytest.raises(AttributeError, match=r"no method 'ad'; its methods: add, fail, pid, value"):
        counter.ad(1)
    with pytest.raises(ZeroDivisionError, match="cannot build"):  # the constructor's error, as its own type
        _executor(r).actor(Broken)
    counter.close()


class Broken:
    def __init__(self) -> None:
        raise ZeroDivisionError("cannot build")
