"""How a worker's threads take turns waiting on a queue (``rtq.worker.claiming``).

Two threads wait on a queue at once, so the one that takes a task leaves the other waiting and
no thread has to be woken while a short task runs; one that takes a task while no other waits
starts another. Every slot must still fill, and a stop must still end every thread's claiming.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import wait_for
from rtq import TaskExecutePolicy
from test_task_queue import hold, lines, make_queue, queue_key, running_ids, task_key

pytestmark = pytest.mark.timeout(120)


def test_every_slot_fills_though_only_two_threads_wait_on_the_queue(r, workers, tmp_path: Path) -> None:
    workers.start("q", args=("--workers", "4"))
    q = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    wait = {"action": "touch_then_wait", "started": str(started), "path": str(release)}
    tasks = [q.build_task(f"s{i}", "q", {**wait, "value": i}) for i in range(6)]
    for i, task in enumerate(tasks[:4]):  # one by one: none is taken along with another (a batch)
        q.submit(task, timeout=30)
        wait_for(lambda i=i: len(lines(started)) == i + 1, 15, f"task {i} to start while {i} run")
    for task in tasks[4:]:
        q.submit(task, timeout=30)
    hold(
        lambda: len(running_ids(r)) == 4 and r.llen(queue_key("q")) == 2 and len(lines(started)) == 4,
        1.0,
        "exactly 4 claimed and 2 still queued",
    )
    release.touch()
    assert [q.wait(t) for t in tasks] == list(range(6))


def test_a_worker_serves_calls_back_to_back_then_stops_promptly(r, workers) -> None:
    proc = workers.start("q", args=("--workers", "4"))
    q = make_queue(r)
    for i in range(200):  # one at a time: the two waiting threads take turns
        assert q.query(f"b{i}", "q", {"action": "echo", "value": i}, policy=TaskExecutePolicy.Remote) == i
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.stdout.read() if proc.stdout else ""
    assert running_ids(r) == []
    assert r.llen(queue_key("q")) == 0


def test_an_id_a_claim_never_took_from_a_landing_list_goes_back_to_the_front_of_its_queue(r) -> None:
    # A claim thread's move landed "a" in its landing list, but the claim sent with it never ran
    # (the connection dropped right between). The thread's next wake-up takes "b": its claim
    # claims "a", the older, and puts "b" back at the head of the queue, unclaimed.
    from rtq.backend.claims import Claims
    from rtq.backend.wire import Channel

    q = make_queue(r)
    for task_id in ("a", "b", "c"):
        q.submit(q.build_task(task_id, "q", {"value": task_id}), timeout=30)
    claims = Claims(q.store, "w-test")
    landing = q.keys.landing("w-test", 0)
    r.lmove(queue_key("q"), landing, "LEFT", "RIGHT")
    channel = Channel(q.store.redis)
    try:
        taken = claims.take(channel, queue_key("q"), "q", landing, 1.0, 0, lambda extra: None, register=True)
    finally:
        channel.close()
    assert [task_id for task_id, _ in taken] == ["a"]
    assert taken[0][1][5] == b"q"  # the claim: attempt, token, expiry, params, params#, name, notify
    assert r.lrange(queue_key("q"), 0, -1) == [b"b", b"c"]
    assert r.lrange(q.keys.running("w-test"), 0, -1) == [b"a"]
    assert r.llen(landing) == 0
    assert r.smembers(q.keys.landings("w-test")) == {landing.encode()}
    assert r.hget(task_key("a"), "state") == b"running"
    assert r.hget(task_key("b"), "state") == b"queued"


def test_a_wake_up_that_times_out_claims_nothing(r) -> None:
    from rtq.backend.claims import Claims
    from rtq.backend.wire import Channel

    q = make_queue(r)
    claims = Claims(q.store, "w-test")
    channel = Channel(q.store.redis)
    try:
        assert claims.take(channel, queue_key("q"), "q", q.keys.landing("w-test", 0), 0.05, 0, lambda e: None) == []
    finally:
        channel.close()
    assert r.llen(q.keys.running("w-test")) == 0
