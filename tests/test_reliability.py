"""Reliable delivery (issue 3): real server, real worker subprocesses, real signals.

Workers run with a short lease (``--lease 1.5``) so that lapses are detected in about two
seconds; every wait is a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import pytest
import redis

from conftest import ROOT, Workers, in_thread, wait_for
from relfns import pids
from rtq.backend.keys import Keys
from rtq.errors import RedisFull, RtqError, TaskCancelled, TaskLost, WorkerLost
from rtq.server import EmbeddedServer
from rtq.task import RedisTask
from rtq.task_queue import RedisTaskQueue, TaskExecutePolicy

FN = "relfns:task"
LEASE = "1.5"
K = Keys("test", "task-queue")
Q = "rel"


def start(workers: Workers, *args: str, env: dict[str, str] | None = None) -> Any:
    return workers.start(Q, task_fn=FN, args=("--lease", LEASE, *args), env=env)


def make_queue(r: redis.Redis, **kwargs: Any) -> RedisTaskQueue:
    kwargs = {"timeout": 30, "interval": 0.5, **kwargs}
    return RedisTaskQueue(r, "test", task_fn=None, **kwargs)


def submit(queue: RedisTaskQueue, task_id: str, params: dict[str, Any], name: str = Q) -> RedisTask:
    task = queue.build_task(task_id, name, params)
    queue.submit(task)
    return task


def field(r: redis.Redis, task_id: str, name: str) -> str | None:
    value = r.hget(K.task(task_id), name)
    return value.decode() if value is not None else None


def record_of(r: redis.Redis, pid: int) -> dict[str, Any] | None:
    """The heartbeat record of the worker process ``pid``, if it has one now."""
    for wid in r.zrange(K.workers(), 0, -1):
        raw = r.get(K.worker(wid.decode()))
        if raw:
            rec = json.loads(raw)
            if rec.get("pid") == pid:
                return rec  # type: ignore[no-any-return]
    return None


def wait_in_thread(queue: RedisTaskQueue, task: RedisTask) -> dict[str, Any]:
    """Wait for ``task`` in a thread; the dict gets ``value`` or ``error``, and ``at``."""
    return in_thread(lambda: queue.wait(task))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- worker death ----------------------------------------------------------------------------
def test_sigkill_mid_task_a_replacement_delivers(r, workers, tmp_path):
    queue = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    a = start(workers)
    task = submit(queue, "k1", {"action": "wait", "started": str(started), "release": str(release)})
    wait_for(lambda: pids(started) == [a.pid], what="worker A to start the task")
    a.kill()
    a.wait(10)
    release.touch()
    b = start(workers)
    assert queue.wait(task) == b.pid
    assert pids(started) == [a.pid, b.pid]
    assert field(r, "k1", "attempt") == "2"
    assert r.llen(K.dead()) == 0


def test_a_killed_workers_helper_ends_its_lease_at_once(r, workers, tmp_path):
    # A's lease is 60 s: B can only take over this fast because A's helper saw A die.
    queue = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    a = workers.start(Q, task_fn=FN, args=("--lease", "60"))
    wait_for(lambda: (record_of(r, a.pid) or {}).get("heartbeat_pid"), what="A's helper")
    task = submit(queue, "h1", {"action": "wait", "started": str(started), "release": str(release)})
    wait_for(lambda: pids(started) == [a.pid], what="worker A to start the task")
    b = start(workers)
    release.touch()
    a.kill()
    a.wait(10)
    wait_for(lambda: pids(started) == [a.pid, b.pid], 15, "worker B to take the task over")
    assert queue.wait(task) == b.pid


def test_kill_between_move_and_claim_requeues_without_using_an_attempt(r, workers, tmp_path):
    # max_attempts=1: had the lost claim counted (or been dropped), the task could never succeed.
    queue = make_queue(r, max_attempts=1)
    moved = tmp_path / "moved"
    a = start(workers, "--max-attempts", "1", env={"RTQ_TEST_PAUSE_AFTER_MOVE": str(moved)})
    task = submit(queue, "m1", {"action": "echo", "value": "delivered"})
    wait_for(lambda: moved.exists() and moved.read_text().split() == ["m1"], what="the id to be moved")
    # The window: the id left the queue for A's landing list, but A has not claimed it.
    a_id = (record_of(r, a.pid) or {})["id"]
    assert field(r, "m1", "state") == "queued"
    assert r.llen(K.queue(Q)) == 0
    assert r.llen(K.running(a_id)) == 0
    a.kill()
    a.wait(10)
    start(workers, "--max-attempts", "1")
    assert queue.wait(task) == "delivered"
    assert field(r, "m1", "attempt") == "1"
    assert r.llen(K.dead()) == 0
    # A's landing lists are gone with the rest of it.
    wait_for(lambda: not list(r.scan_iter(match=f"{K.landings(a_id)}*")), what="A's landing lists to be removed")


def test_a_worker_stopped_between_move_and_claim_puts_the_id_back(r, workers, tmp_path):
    queue = make_queue(r, max_attempts=1)
    moved = tmp_path / "moved"
    a = start(workers, "--max-attempts", "1", env={"RTQ_TEST_PAUSE_AFTER_MOVE": str(moved)})
    task = submit(queue, "m2", {"action": "echo", "value": "delivered"})
    wait_for(lambda: moved.exists() and moved.read_text().split() == ["m2"], what="the id to be moved")
    a_id = (record_of(r, a.pid) or {})["id"]
    assert r.llen(K.queue(Q)) == 0
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0
    # Back at the front of its queue, unclaimed and with no attempt used; nothing of A is left.
    assert r.lrange(K.queue(Q), 0, -1) == [b"m2"]
    assert field(r, "m2", "state") == "queued"
    assert field(r, "m2", "attempt") in (None, "0")
    assert not list(r.scan_iter(match=f"{K.landings(a_id)}*"))
    start(workers, "--max-attempts", "1")
    assert queue.wait(task) == "delivered"


def test_sigstop_past_the_lease_keeps_only_the_newer_result(r, workers, tmp_path):
    queue = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    a = start(workers)
    task = submit(queue, "f1", {"action": "wait", "started": str(started), "release": str(release)})
    wait_for(lambda: pids(started) == [a.pid], what="worker A to start the task")
    a.send_signal(signal.SIGSTOP)
    try:
        box = wait_in_thread(queue, task)  # a waiting caller also reaps lapsed workers
        b = start(workers)
        wait_for(lambda: pids(started) == [a.pid, b.pid], 20, "worker B to take the task over")
        release.touch()
        box["thread"].join(20)
        assert box.get("value") == b.pid, box
        # B's notification, unless the caller found the outcome in the record first.
        notified = r.llen(K.done("f1"))
    finally:
        a.send_signal(signal.SIGCONT)
    # A resumes with a stale claim: its outcome must be discarded, not overwrite B's.
    wait_for(lambda: (record_of(r, a.pid) or {}).get("done", 0) >= 1, 20, "worker A to end its stale run")
    assert queue.get_task("f1").result == b.pid
    assert field(r, "f1", "attempt") == "2"
    assert r.llen(K.done("f1")) == notified  # A's stale end notified no one
    assert a.poll() is None  # and A lives on


# -- graceful shutdown -----------------------------------------------------------------------
def test_sigterm_lets_running_tasks_finish_and_exits_0(r, workers, tmp_path):
    queue = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    a = start(workers, "--workers", "2", "--grace", "60")
    params = {"action": "wait", "started": str(started), "release": str(release)}
    t1, t2 = submit(queue, "g1", params), submit(queue, "g2", params)
    wait_for(lambda: len(pids(started)) == 2, what="both tasks to start")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: (record_of(r, a.pid) or {}).get("stopping"), what="the worker to start draining")
    t3 = submit(queue, "g3", {"action": "echo", "value": 3})
    release.touch()
    assert queue.wait(t1) == a.pid
    assert queue.wait(t2) == a.pid
    assert a.wait(20) == 0
    assert field(r, t3.id, "state") == "queued"  # taken by no one: the worker stopped claiming
    assert r.lrange(K.queue(Q), 0, -1) == [b"g3"]
    assert not r.exists(K.listen(Q))


def patient_worker(workers: Workers) -> Any:
    """A one-slot worker whose claim thread blocks on the queue for 10 s at a time."""
    return start(workers, "--workers", "1", "--interval", "10")


def stop_while_it_waits(r: redis.Redis, a: Any) -> str:
    """SIGTERM worker ``a`` while its claim thread blocks on the queue; its id."""
    wait_for(lambda: r.info("clients")["blocked_clients"] >= 1, what="the worker to wait on its queue")
    a_id = (record_of(r, a.pid) or {})["id"]
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: (record_of(r, a.pid) or {}).get("stopping"), what="the worker to start stopping")
    return a_id


def test_a_task_that_lands_as_the_worker_stops_goes_back_unrun(r, workers):
    # The move that wakes the claim thread carries the claim: the task is claimed already when
    # the thread sees the worker stopping. It must go back to its queue with no attempt used.
    queue = make_queue(r)
    a = patient_worker(workers)
    a_id = stop_while_it_waits(r, a)
    task = submit(queue, "late", {"action": "echo", "value": "delivered"})
    assert a.wait(30) == 0
    assert r.lrange(K.queue(Q), 0, -1) == [b"late"]
    assert field(r, "late", "state") == "queued"
    assert field(r, "late", "attempt") in (None, "0")
    assert r.llen(K.running(a_id)) == 0
    start(workers)
    assert queue.wait(task) == "delivered"


def test_a_stale_entry_that_lands_as_the_worker_stops_is_still_dead_lettered_and_logged(r, workers):
    queue = make_queue(r)
    for _ in range(5):  # the entry must land while the stopping worker's claim thread still blocks
        a = patient_worker(workers)
        assert queue.query("twice", Q, {"action": "echo", "value": 1}, policy=TaskExecutePolicy.Remote) == 1
        stop_while_it_waits(r, a)
        r.rpush(K.queue(Q), "twice")
        out, _ = a.communicate(timeout=30)
        assert a.returncode == 0
        if r.llen(K.queue(Q)) == 0:  # the stopping worker took it
            break
        r.delete(K.queue(Q))  # its wait ran out just before: stopped without taking it; again
    else:
        pytest.fail("the entry never reached a stopping worker's claim")
    assert "dropped task twice from queue rel" in out, out
    entries = [json.loads(e) for e in r.lrange(K.dead(), 0, -1)]
    assert [e["id"] for e in entries] == ["twice"] and "already ended (done)" in entries[0]["error"]
    assert queue.get_task("twice").result == 1  # the outcome stands


@pytest.mark.parametrize("action", ["wait", "sleep"])
def test_sigterm_past_grace_requeues_the_task_and_exits_0(r, workers, tmp_path, action):
    # "wait" runs Python code (stopped by an async exception); "sleep" sits in one C call
    # that cannot be interrupted, so the worker must exit without waiting for it.
    queue = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    a = start(workers, "--grace", "1")
    params = {"action": action, "started": str(started), "release": str(release), "seconds": 90}
    task = submit(queue, "s1", params)
    wait_for(lambda: pids(started) == [a.pid], what="the task to start")
    a.send_signal(signal.SIGTERM)
    assert a.wait(20) == 0
    assert field(r, "s1", "state") == "queued"
    assert field(r, "s1", "attempt") == "0"  # the shutdown did not use up an attempt
    assert r.lrange(K.queue(Q), 0, -1) == [b"s1"]
    release.touch()
    b = start(workers)
    if action == "sleep":  # nobody wants to wait 90 s: enough that B took it over
        wait_for(lambda: pids(started) == [a.pid, b.pid], what="worker B to take it over")
        assert field(r, "s1", "attempt") == "1"
    else:
        assert queue.wait(task) == b.pid


# -- attempts and the dead-letter list -------------------------------------------------------
def test_attempts_exhausted_fail_with_worker_lost_and_a_dead_letter(r, workers, tmp_path):
    queue = make_queue(r, max_attempts=2)
    started, release = tmp_path / "started", tmp_path / "release"
    task = submit(queue, "x1", {"action": "wait", "started": str(started), "release": str(release)})
    box = wait_in_thread(queue, task)
    for n in (1, 2):
        w = start(workers, "--max-attempts", "2")
        wait_for(lambda w=w: pids(started)[-1:] == [w.pid], what=f"attempt {n} to start")
        w.kill()
        w.wait(10)
    box["thread"].join(20)
    assert isinstance(box.get("error"), WorkerLost), box
    assert "2 attempt(s)" in str(box["error"])
    dead = [json.loads(e) for e in r.lrange(K.dead(), 0, -1)]
    assert [d["id"] for d in dead] == ["x1"]
    assert "WorkerLost" in dead[0]["error"]
    assert field(r, "x1", "state") == "failed"


def test_the_attempt_limit_a_task_was_submitted_under_holds_whoever_reaps_it(r, workers, tmp_path):
    # A record written by an older rtq carries no limit: the reaper applies its own.
    for limit, outcome in ((2, "queued"), (1, "failed")):
        task_id = f"old-{limit}"
        fields = {"name": "served-by-none", "state": "running", "owner": "ghost", "attempt": 1, "expiry": 1e10}
        r.hset(K.task(task_id), mapping=fields)
        r.rpush(K.running("ghost"), task_id)
        r.zadd(K.workers(), {"ghost": 0})
        assert make_queue(r, max_attempts=limit).reaper.reap() == 1
        assert field(r, task_id, "state") == outcome
    assert "(max_attempts=1)" in json.loads(r.lpop(K.dead()))["error"]

    # The caller allows one attempt; the workers, which reap each other's tasks, allow three.
    queue = make_queue(r, max_attempts=1)
    started, release = tmp_path / "started", tmp_path / "release"
    a = start(workers, "--max-attempts", "3")
    task = submit(queue, "lim1", {"action": "wait", "started": str(started), "release": str(release)})
    wait_for(lambda: pids(started) == [a.pid], what="worker A to start the task")
    start(workers, "--max-attempts", "3")  # B reaps A's task (the caller is not waiting yet)
    a.kill()
    a.wait(10)
    wait_for(lambda: field(r, "lim1", "state") == "failed" or len(pids(started)) > 1, 20, "the task to be recovered")
    assert pids(started) == [a.pid], "the task was claimed again past the limit it was submitted under"
    with pytest.raises(WorkerLost, match=r"after 1 attempt\(s\) \(max_attempts=1\)"):
        queue.wait(task)
    assert [json.loads(e)["id"] for e in r.lrange(K.dead(), 0, -1)] == ["lim1"]


# -- cancellation ----------------------------------------------------------------------------
def test_cancel_a_queued_task_it_never_runs(r, workers, tmp_path):
    queue = make_queue(r)
    started, release, started2 = tmp_path / "started", tmp_path / "release", tmp_path / "started2"
    start(workers, "--workers", "1")
    t1 = submit(queue, "c1", {"action": "wait", "started": str(started), "release": str(release)})
    wait_for(lambda: pids(started), what="the slot to be taken")
    t2 = submit(queue, "c2", {"action": "wait", "started": str(started2), "release": str(release)})
    assert queue.cancel("c2") == "queued"
    with pytest.raises(TaskCancelled):
        queue.wait(t2)
    release.touch()
    queue.wait(t1)
    assert queue.wait(submit(queue, "c3", {"action": "echo", "value": 3})) == 3  # the queue moved past c2
    assert not started2.exists()
    assert field(r, "c2", "attempt") is None


def test_cancel_a_running_task_makes_update_raise(r, workers, tmp_path):
    queue = make_queue(r)
    started, release, ended = tmp_path / "started", tmp_path / "release", tmp_path / "ended"
    start(workers, "--workers", "1")
    params = {"action": "wait", "update": True, "started": str(started), "release": str(release), "ended": str(ended)}
    t1 = submit(queue, "u1", params)
    wait_for(lambda: pids(started), what="the task to start")
    assert queue.cancel("u1") == "running"
    with pytest.raises(TaskCancelled):
        queue.wait(t1)
    # The slot frees although the task was never released.
    assert queue.wait(submit(queue, "u2", {"action": "echo", "value": 2})) == 2
    assert ended.read_text().splitlines()[0] == "update raised TaskCancelled"
    assert not release.exists()


def test_cancel_stops_a_running_task_that_never_calls_update(r, workers, tmp_path):
    queue = make_queue(r)
    started, release, ended = tmp_path / "started", tmp_path / "release", tmp_path / "ended"
    start(workers, "--workers", "1")
    params = {"action": "wait", "started": str(started), "release": str(release), "ended": str(ended)}
    t1 = submit(queue, "n1", params)
    wait_for(lambda: pids(started), what="the task to start")
    assert queue.cancel("n1") == "running"
    with pytest.raises(TaskCancelled):
        queue.wait(t1)
    assert queue.wait(submit(queue, "n2", {"action": "echo", "value": 2})) == 2
    assert ended.read_text().splitlines() == ["stopped: TaskCancelled"]


# -- Redis outages ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_worker_survives_a_redis_restart_and_serves_after(tmp_path):
    port = _free_port()
    server = EmbeddedServer(port=port).start()
    pool = Workers(server.url)
    client = redis.Redis.from_url(server.url)
    try:
        queue = make_queue(client)
        started, release = tmp_path / "started", tmp_path / "release"
        a = pool.start(Q, task_fn=FN, args=("--lease", LEASE, "--workers", "2"))
        helper = wait_for(lambda: (record_of(client, a.pid) or {}).get("heartbeat_pid"), what="the helper")
        assert queue.wait(submit(queue, "r1", {"action": "echo", "value": 1})) == 1
        task = submit(queue, "r2", {"action": "wait", "started": str(started), "release": str(release)})
        wait_for(lambda: pids(started), what="the task to start")
        box = wait_in_thread(queue, task)

        server.stop()
        before = cpu_seconds(a.pid) + cpu_seconds(helper)
        window = time.monotonic()
        with pytest.raises(Exception, match="timed out"):  # alive all along while Redis is away
            a.wait(3)
        used = cpu_seconds(a.pid) + cpu_seconds(helper) - before
        assert used < 0.3 * (time.monotonic() - window), f"busy loop: {used:.2f}s CPU while Redis was down"
        assert box["thread"].is_alive()  # the caller waits through the outage too

        server.start()  # the same port and password; no persistence: everything is gone
        restarted = time.monotonic()
        box["thread"].join(30)
        assert isinstance(box.get("error"), TaskLost), box  # an RtqError, seconds after the restart
        assert box["at"] - restarted < 20  # (not a TaskTimeout at its 30 s deadline)
        wait_for(lambda: client.exists(K.listen(Q)), 30, "the worker to mark its queue again")
        assert queue.wait(submit(queue, "r3", {"action": "echo", "value": 3})) == 3
        assert a.poll() is None
    finally:
        pool.kill_all()
        client.close()
        server.stop()


def test_flushdb_under_a_waiting_caller_raises_rtq_error_fast(r, workers, tmp_path):
    # The queue's default interval (5 s) bounds how long a caller waits without news.
    queue = make_queue(r, interval=5, timeout=120)
    started, release = tmp_path / "started", tmp_path / "release"
    start(workers)
    running = submit(queue, "v1", {"action": "wait", "started": str(started), "release": str(release)})
    queued = submit(queue, "v2", {"action": "echo", "value": 2}, name="nobody-serves-this")
    wait_for(lambda: pids(started), what="the task to start")
    boxes = [wait_in_thread(queue, running), wait_in_thread(queue, queued)]
    r.flushdb()
    flushed = time.monotonic()
    for box in boxes:
        box["thread"].join(60)
        assert isinstance(box.get("error"), RtqError), box
        assert box["at"] - flushed < 30  # well before the 120 s deadline
    # A worker running the task learns it vanished and wakes its caller at once.
    assert boxes[0]["at"] - flushed < 15


def test_the_big_result_of_a_vanished_task_leaves_nothing_behind(r, workers, tmp_path):
    """Result frames written for a record that vanished mid-run (flush, eviction) never linger."""
    queue = make_queue(r, timeout=120)
    started, release = tmp_path / "started", tmp_path / "release"
    a = workers.start(Q, task_fn=FN, args=("--lease", "10"))  # the watcher stays out of the way
    params = {"action": "wait", "started": str(started), "release": str(release), "result_bytes": 2 << 20}
    submit(queue, "big1", params)
    wait_for(lambda: pids(started), what="the task to start")
    wid = wait_for(lambda: (record_of(r, a.pid) or {}).get("id"), what="the worker's record")
    assert r.llen(K.running(wid)) == 1
    r.delete(K.task("big1"))
    release.touch()
    wait_for(lambda: r.llen(K.running(wid)) == 0, what="the worker to end the task")
    assert not r.exists(K.task("big1")), r.hkeys(K.task("big1"))
    assert a.poll() is None


def frames_of(r: redis.Redis, task_id: str) -> list[str]:
    """The big frames stored under keys of their own for ``task_id``, by name (``result.a1.0``…)."""
    head = K.frame(task_id, "")
    return sorted(k.decode()[len(head) :] for k in r.scan_iter(match=K.frame(task_id, "*")))


def test_a_worker_killed_while_it_writes_a_big_result_leaves_no_frame_behind(r, workers, tmp_path):
    queue = make_queue(r, timeout=120)
    release, paused = tmp_path / "release", tmp_path / "paused"
    release.touch()
    # The hook makes A send its outcome up to the first big frame and hold the rest back.
    a = start(workers, env={"RTQ_TEST_PAUSE_IN_OUTCOME": str(paused)})
    big = {"result_bytes": 2 << 20, "result_parts": 4}  # four frames (bigger buffers go by digest)
    task = submit(queue, "kw1", {"action": "wait", "release": str(release), **big})
    wait_for(lambda: paused.exists() and paused.read_text().split() == ["kw1"], what="A to be writing the result")
    a.kill()
    a.wait(10)
    # A's helper ends its lease at once; any reaper (here the caller's queue) gives the task back.
    wait_for(lambda: queue.reaper.reap() or field(r, "kw1", "state") == "queued", what="the task to be requeued")
    assert frames_of(r, "kw1") == [], "frames of a dead worker's result are left in Redis"
    start(workers)
    assert sum(part.nbytes for part in queue.wait(task)) == 2 << 20
    assert frames_of(r, "kw1") == [f"result.a2.{i}" for i in range(4)]


def test_the_big_result_of_a_run_taken_over_is_deleted_when_it_ends(r, workers, tmp_path):
    queue = make_queue(r)
    release, paused = tmp_path / "release", tmp_path / "paused"
    release.touch()
    a = start(workers, env={"RTQ_TEST_PAUSE_IN_OUTCOME": str(paused)})
    helper = wait_for(lambda: (record_of(r, a.pid) or {}).get("heartbeat_pid"), what="A's helper")
    big = {"result_bytes": 2 << 20, "result_parts": 4}  # four frames (bigger buffers go by digest)
    task = submit(queue, "to1", {"action": "wait", "release": str(release), **big})
    wait_for(lambda: paused.exists() and paused.read_text().split() == ["to1"], what="A to be writing the result")
    a.send_signal(signal.SIGSTOP)  # mid-write, and with its helper gone its lease lapses
    os.kill(helper, signal.SIGKILL)
    try:
        start(workers)
        assert sum(part.nbytes for part in queue.wait(task)) == 2 << 20  # B's run (the waiting caller reaps A)
    finally:
        a.send_signal(signal.SIGCONT)
    assert field(r, "to1", "attempt") == "2"
    Path(f"{paused}.go").touch()  # A sends the rest of its stale result: discarded, frames and all
    wait_for(lambda: (record_of(r, a.pid) or {}).get("done", 0) >= 1, 20, "worker A to end its stale run")
    assert frames_of(r, "to1") == [f"result.a2.{i}" for i in range(4)]
    assert sum(part.nbytes for part in queue.wait(task)) == 2 << 20  # B's result stands


SERVERS = {"valkey": None, "redis": shutil.which("redis-server")}


@pytest.mark.parametrize("server_kind", list(SERVERS))
def test_redis_refusing_a_result_for_memory_fails_the_task_and_says_why(tmp_path, server_kind):
    if server_kind != "valkey" and SERVERS[server_kind] is None:
        pytest.skip("no redis-server on PATH")
    server = EmbeddedServer(
        binary=SERVERS[server_kind], args=("--maxmemory", "16mb", "--maxmemory-policy", "noeviction")
    ).start()
    pool = Workers(server.url)
    client = redis.Redis.from_url(server.url)
    try:
        queue = make_queue(client)
        release = tmp_path / "release"
        release.touch()
        pool.start(Q, task_fn=FN, args=("--lease", LEASE))
        task = submit(queue, "oom1", {"action": "wait", "release": str(release), "result_bytes": 32 << 20})
        refused = r"Redis refused the result of task oom1 in rel \(32\.\d MiB\) for lack of memory: OOM command"
        with pytest.raises(RedisFull, match=refused + " not allowed when used memory > 'maxmemory'"):
            queue.wait(task)
        assert field(client, "oom1", "state") == "failed" and frames_of(client, "oom1") == []
        dead = [json.loads(e) for e in client.lrange(K.dead(), 0, -1)]
        assert [d["id"] for d in dead] == ["oom1"] and dead[0]["error"].startswith("RedisFull: Redis refused")
        # Still serving, once Redis has let go of the refused transaction's memory.
        wait_for(lambda: client.info("memory")["used_memory"] < 16 << 20, 30, "Redis to free the refused result")
        assert queue.wait(submit(queue, "oom2", {"action": "echo", "value": 2})) == 2

        # A submission Redis refuses says so too: a big one (a transaction of plain commands)...
        big = {"action": "echo", "value": numpy.zeros(32 << 20, dtype=numpy.uint8)}
        with pytest.raises(RedisFull, match=r"Redis refused task oom3 in rel for lack of memory: OOM command"):
            submit(queue, "oom3", big)
        # ... and small ones (submit.lua) once Redis is full for good.
        client.config_set("maxmemory", max(1, client.info("memory")["used_memory"] // 2))
        with pytest.raises(RedisFull, match=r"Redis refused task oom4 in rel for lack of memory: OOM command"):
            submit(queue, "oom4", {"action": "echo", "value": 4})
        with pytest.raises(RedisFull, match=r"Redis refused a batch of 2 tasks for lack of memory: OOM command"):
            queue.store.submit([(queue.build_task(f"oom{i}", Q, i), "t", None) for i in (5, 6)])
        assert not any(client.exists(K.task(f"oom{i}")) for i in (3, 4, 5, 6))
        assert client.lrange(K.queue(Q), 0, -1) == []
    finally:
        pool.kill_all()
        client.close()
        server.stop()


# -- liveness under load ---------------------------------------------------------------------
def test_busy_past_timeout_with_the_gil_held_keeps_marker_and_lease(r, workers):
    """A task holding the GIL for longer than the marker's lifetime and the lease."""
    queue = make_queue(r)
    a = workers.start(Q, task_fn=FN, args=("--lease", LEASE, "--workers", "1"), timeout=2)
    wid = wait_for(lambda: (record_of(r, a.pid) or {}).get("id"), what="the worker's record")
    task = submit(queue, "b1", {"action": "hold_gil", "seconds": 5})
    box = wait_in_thread(queue, task)
    wait_for(lambda: field(r, "b1", "state") == "running", what="the task to start")
    gaps = []
    while box["thread"].is_alive():
        if not r.exists(K.listen(Q)):
            gaps.append("marker")
        if not r.exists(K.worker(wid)):
            gaps.append("lease")
        box["thread"].join(0.05)
    assert box.get("value") == a.pid, box
    assert gaps == []
    assert field(r, "b1", "attempt") == "1"  # never taken for dead and rerun


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_the_heartbeat_helper_of_a_keyword_made_client_stays_up_through_a_gil_held_task(r, redis_url, workers):
    """The helper gets only plain settings: redis-py 8.1's sentinel defaults once crash-looped it."""
    queue = make_queue(r)
    code = f"import relfns; relfns.serve_with_a_keyword_client({redis_url!r}, {Q!r}, {float(LEASE)})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT / "src")])}
    a = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    workers.procs.append(a)  # killed at the end like the fixture's own
    helper = wait_for(lambda: (record_of(r, a.pid) or {}).get("heartbeat_pid"), 30, "the worker's helper")
    wid = record_of(r, a.pid)["id"]  # type: ignore[index]
    task = submit(queue, "h1", {"action": "hold_gil", "seconds": 5})
    box = wait_in_thread(queue, task)
    wait_for(lambda: field(r, "h1", "state") == "running", what="the task to start")
    gaps, helpers = [], set()
    while box["thread"].is_alive():  # the task holds the GIL far past the 1.5 s lease
        if not _alive(helper):
            gaps.append("helper")
        if not r.exists(K.worker(wid)):
            gaps.append("lease")
        helpers.add((record_of(r, a.pid) or {}).get("heartbeat_pid"))
        box["thread"].join(0.05)
    assert box.get("value") == a.pid, box
    assert gaps == [] and helpers == {helper}, (gaps, helpers)
    assert field(r, "h1", "attempt") == "1"  # never taken for dead and run twice
    assert _alive(helper) and a.poll() is None


# -- eviction --------------------------------------------------------------------------------
EVICTING = ("--maxmemory", "50mb", "--maxmemory-policy", "allkeys-lru")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("server_args", "acl", "warned"),
    [
        (EVICTING, None, True),
        (("--maxmemory", "50mb", "--maxmemory-policy", "volatile-lru"), None, True),  # rtq's keys have TTLs
        (("--maxmemory", "50mb", "--maxmemory-policy", "noeviction"), None, False),
        (("--maxmemory", "0", "--maxmemory-policy", "allkeys-lru"), None, False),  # no limit: nothing evicted
        (EVICTING, "-info", False),  # an ACL refuses INFO: no second, CONFIG, denial in its log
        (EVICTING, "-config", True),  # CONFIG refused (as on managed services): INFO still tells
        (EVICTING, "-config -info", False),  # neither: nothing to say, and the worker serves all the same
    ],
)
def test_worker_warns_at_start_when_redis_may_evict_its_keys(server_args, acl, warned):
    binary = shutil.which("redis-server")  # a real Redis when there is one; else the embedded Valkey
    with EmbeddedServer(binary=binary, args=server_args) as server:
        url = server.url
        if acl:
            with redis.Redis.from_url(server.url) as admin:
                admin.execute_command(
                    "ACL", "SETUSER", "limited", "on", ">limited-pw", "~*", "&*", "+@all", *acl.split()
                )
            url = f"redis://limited:limited-pw@127.0.0.1:{server.port}/0"
        pool = Workers(url)
        try:
            proc = pool.start(Q, task_fn=FN)
            client = redis.Redis.from_url(url)
            assert make_queue(client).wait(submit(make_queue(client), "e1", {"action": "echo", "value": 1})) == 1
            proc.terminate()
            output, _ = proc.communicate(timeout=30)
        finally:
            pool.kill_all()
    warnings = [line for line in output.splitlines() if "may evict rtq's keys" in line]
    if warned:
        policy = server_args[server_args.index("--maxmemory-policy") + 1]
        assert len(warnings) == 1, output
        assert f"maxmemory is 50.0 MiB with maxmemory-policy {policy}" in warnings[0], warnings
        assert "CONFIG SET maxmemory-policy noeviction" in warnings[0], warnings
    else:
        assert warnings == [], output
    assert "Traceback" not in output, output


# -- soak ------------------------------------------------------------------------------------
@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_random_sigkills_lose_nothing(r, workers, tmp_path):
    """Tasks over 3 workers, one SIGKILLed after every few dozen executions; nothing may be lost.

    Half the kills take the heartbeat helper down too (only the lease can tell); the other half
    leave it to see its worker die. Recovery time: from the kill until none of the dead worker's
    tasks is still running under its name.
    """
    import random
    import subprocess
    import sys

    from conftest import ROOT, TESTS

    rng = random.Random(int(os.environ.get("RTQ_SOAK_SEED", "3")))
    n_tasks = int(os.environ.get("RTQ_SOAK_TASKS", "2000"))
    log = tmp_path / "executions"
    log.touch()
    queue = make_queue(r, timeout=900, max_attempts=100)
    cmd = [sys.executable, "-m", "rtq", "worker", Q, "--url", workers.url, "--prefix", "test", "--task-fn", FN]
    cmd += ["--interval", "0.5", "--timeout", "30", "--lease", LEASE, "--workers", "4", "--max-attempts", "100"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}

    def spawn() -> subprocess.Popen[str]:
        # Output goes to a file: a full pipe nobody reads would block a worker mid-log.
        with open(tmp_path / "workers.log", "a") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        workers.procs.append(proc)
        return proc

    def executions() -> list[str]:
        return [line.split()[0] for line in log.read_text().splitlines()]

    ids = [f"s{i}" for i in range(n_tasks)]
    for task_id in ids:
        submit(queue, task_id, {"action": "log", "log": str(log), "seconds": rng.uniform(0.05, 0.2)})
    live = [spawn() for _ in range(3)]
    kills, recoveries = 0, {"helper saw it": [], "lease lapsed": []}
    pending: list[tuple[list[str], str, str, float]] = []  # held ids, dead worker, how, killed at

    def settle() -> bool:
        """Record the recoveries that completed; True when none is pending."""
        for item in list(pending):
            held, dead, how, killed_at = item
            if all(field(r, t, "state") != "running" or field(r, t, "owner") != dead for t in held):
                recoveries[how].append(time.monotonic() - killed_at)
                pending.remove(item)
        return not pending

    while r.llen(K.queue(Q)) > 0:
        target = len(executions()) + rng.randint(10, 60)
        wait_for(lambda t=target: (settle() or True) and (len(executions()) >= t or not r.llen(K.queue(Q))), 120)
        ready = [(p, rec) for p in live if (rec := record_of(r, p.pid)) and rec.get("heartbeat_pid")]
        if not ready:
            continue
        victim, rec = rng.choice(ready)
        how = rng.choice(list(recoveries))
        if how == "lease lapsed":  # stop it first, so the helper stops beating, then kill both
            victim.send_signal(signal.SIGSTOP)
            os.kill(rec["heartbeat_pid"], signal.SIGKILL)
        held = [t.decode() for t in r.lrange(K.running(rec["id"]), 0, -1)]
        victim.kill()
        killed_at = time.monotonic()
        victim.wait(10)
        kills += 1
        if held:
            pending.append((held, rec["id"], how, killed_at))
        live.remove(victim)
        live.append(spawn())
    wait_for(settle, 60, "the killed workers' tasks to be given back")

    def all_ended() -> bool:
        if len(set(executions())) < n_tasks:
            return False
        pipe = r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(K.task(task_id), "state")
        return all(state == b"done" for state in pipe.execute())

    wait_for(all_ended, 300, "every task to end")
    lost = [t for t in ids if queue.get_task(t).result != t]
    runs = executions()
    every = recoveries["helper saw it"] + recoveries["lease lapsed"]

    def figures(values: list[float]) -> str:
        return f"median {statistics.median(values):.2f}s max {max(values):.2f}s (n={len(values)})" if values else "n=0"

    print(
        f"\nsoak: tasks={n_tasks} kills={kills} lost={len(lost)} duplicate_executions={len(runs) - len(set(runs))}"
        f"\n  recovery, all kills holding tasks: {figures(every)}"
        + "".join(f"\n  recovery, {how}: {figures(values)}" for how, values in recoveries.items())
    )
    assert lost == []
    assert set(runs) == set(ids)
