"""The seed API on a real Redis: policies, pushed wake-ups, listeners, progress, ids and keys.

Listeners run as ``rtq worker`` subprocesses (the ``workers`` fixture) wherever the behaviour
involves one; only the tests that need to set ``listen()``'s stop event, or to give the listener a
particular client, run ``listen()`` in a thread of the test process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import rtq.collector
from conftest import wait_for
from rtq import RedisTask, RedisTaskQueue, TaskExecutePolicy
from rtq.errors import TaskTimeout
from taskfns import Boom, echo_task

P = TaskExecutePolicy
HEAD = "test|task-queue|"


def queue_key(name: str) -> str:
    return f"{HEAD}task-queue|{name}"


def task_key(task_id: str) -> str:
    return f"{HEAD}task-result:{task_id}"


def listen_key(name: str) -> str:
    return f"{HEAD}task-listen|{name}"


def done_key(task_id: str) -> str:
    return f"{HEAD}task-done:{task_id}"


def make_queue(client: redis.Redis, **kwargs: Any) -> RedisTaskQueue:
    options: dict[str, Any] = {"timeout": 30, "interval": 0.5, "task_fn": echo_task, **kwargs}
    return RedisTaskQueue(client, "test", **options)


def running_ids(r: redis.Redis) -> list[bytes]:
    """Every id held in some listener's in-progress list."""
    ids: list[bytes] = []
    for key in r.scan_iter(match=f"{HEAD}task-running|*"):
        ids += r.lrange(key, 0, -1)
    return ids


def hold(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Assert that ``condition`` stays true on every check for ``seconds``."""
    end = time.monotonic() + seconds

    def check() -> bool:
        assert condition(), what
        return time.monotonic() > end

    wait_for(check, seconds + 10, what)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def local_pid(task: RedisTask) -> Any:
    return ("local", os.getpid())


def local_raises(task: RedisTask) -> Any:
    raise RuntimeError("no GPU here")


class ListenThreads:
    """Runs ``queue.listen()`` in threads of the test process; at the end, stops and joins them,
    then closes the clients made with :meth:`client`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started: list[tuple[threading.Event, threading.Thread]] = []
        self.clients: list[redis.Redis] = []

    def client(self, **kwargs: Any) -> redis.Redis:
        client = redis.Redis.from_url(self.url, **kwargs)
        self.clients.append(client)
        return client

    def start(
        self, queue: RedisTaskQueue, names: list[str], workers: int = 4
    ) -> tuple[threading.Event, threading.Thread]:
        event = threading.Event()
        thread = threading.Thread(target=queue.listen, args=(names, workers, event), daemon=True)
        thread.start()
        self.started.append((event, thread))
        return event, thread

    def close(self) -> None:
        for event, _ in self.started:
            event.set()
        for _, thread in self.started:
            thread.join(15)
        for client in self.clients:
            client.close()
        assert not any(t.is_alive() for _, t in self.started), "listen() did not return after its event was set"


@pytest.fixture
def unpolled(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A client whose blocking calls are not capped by a socket timeout, for a queue given a long
    ``interval``; and a collector whose periodic check of records is a minute apart.

    A caller then learns of an end or a deadline without a push or a computed wake-up only after
    30 s or more: "promptly" is "well before that", which a loaded machine meets too, where a
    bound of a second or two on an idle one's timing does not.
    """
    monkeypatch.setattr(rtq.collector, "CHECK_PERIOD", 60.0)
    client = redis.Redis.from_url(redis_url, socket_timeout=None)
    yield client
    client.close()


PROMPT = 10.0
"""Seconds within which "promptly" is met: well before the 30 s ``interval`` of an unpolled queue."""


@pytest.fixture
def listeners(redis_url: str, r: redis.Redis) -> Iterator[ListenThreads]:
    threads = ListenThreads(redis_url)
    yield threads
    threads.close()


# -- policies ----------------------------------------------------------------------------------


def test_auto_runs_remotely_when_the_queue_is_listened(r, workers):
    proc = workers.start("q")
    q = make_queue(r, task_fn=local_pid)
    assert q.is_listened("q")
    assert q.query("a1", "q", {"action": "pid"}, timeout=5) == proc.pid


def test_auto_runs_locally_when_nobody_listens(r, workers):
    workers.start("other")  # a listener on another queue does not count
    q = make_queue(r, task_fn=local_pid)
    assert not q.is_listened("q")
    assert q.query("a2", "q", {"action": "pid"}, timeout=2) == ("local", os.getpid())
    assert r.llen(queue_key("q")) == 0


def test_local_runs_here_even_when_a_listener_exists(r, workers):
    workers.start("q")
    q = make_queue(r, task_fn=local_pid)
    assert q.query("l1", "q", {"action": "pid"}, policy=P.Local) == ("local", os.getpid())
    assert r.llen(queue_key("q")) == 0
    assert q.get_task("l1").result == ("local", os.getpid())


def test_remote_runs_on_the_listener(r, workers):
    proc = workers.start("q")
    q = make_queue(r, task_fn=local_raises)
    assert q.query("r1", "q", {"action": "pid"}, timeout=5, policy=P.Remote) == proc.pid


def test_local_first_runs_here_when_that_works(r, workers):
    workers.start("q")
    q = make_queue(r, task_fn=local_pid)
    assert q.query("lf1", "q", {"action": "pid"}, timeout=5, policy=P.LocalFirst) == ("local", os.getpid())
    assert r.llen(queue_key("q")) == 0


def test_local_first_falls_back_to_remote_when_local_raises(r, workers):
    proc = workers.start("q")
    q = make_queue(r, task_fn=local_raises)
    assert q.query("lf2", "q", {"action": "pid"}, timeout=5, policy=P.LocalFirst) == proc.pid
    assert q.get_task("lf2").result == proc.pid


def test_remote_first_runs_remotely_when_that_works(r, workers):
    proc = workers.start("q")
    q = make_queue(r, task_fn=local_pid)
    assert q.query("rf1", "q", {"action": "pid"}, timeout=5, policy=P.RemoteFirst) == proc.pid


def test_remote_first_falls_back_to_local_when_remote_raises(r, workers):
    workers.start("q")
    q = make_queue(r, task_fn=local_pid)
    result = q.query("rf2", "q", {"action": "raise", "message": "remote broke"}, timeout=5, policy=P.RemoteFirst)
    assert result == ("local", os.getpid())


def test_remote_first_falls_back_to_local_when_remote_times_out(unpolled):
    q = make_queue(unpolled, task_fn=local_pid, interval=30)  # nobody listens: the remote run times out
    start = time.monotonic()
    assert q.query("rf3", "q", {"action": "pid"}, timeout=0.5, policy=P.RemoteFirst) == ("local", os.getpid())
    assert 0.45 <= time.monotonic() - start < PROMPT  # at the deadline, not at the next interval


# -- waiting, results, errors, deadlines -----------------------------------------------------


def test_remote_caller_is_woken_by_push_not_by_interval(unpolled, workers):
    workers.start("q")
    q = make_queue(unpolled, interval=30, timeout=60)
    for i in range(3):
        start = time.monotonic()
        assert q.query(f"w{i}", "q", {"action": "echo", "value": i}, policy=P.Remote) == i
        assert time.monotonic() - start < PROMPT  # a poll would take `interval`, a check a minute
    # a task that takes a while: the caller wakes when it ends, not at the next interval
    start = time.monotonic()
    assert q.query("w-slow", "q", {"action": "sleep", "seconds": 0.6, "value": "v"}, policy=P.Remote) == "v"
    assert 0.55 <= time.monotonic() - start < PROMPT


def test_a_task_that_returns_none_is_finished(r, unpolled, workers):
    workers.start("q")
    q = make_queue(unpolled, interval=30, timeout=60)
    start = time.monotonic()
    assert q.query("n1", "q", {"action": "none"}, policy=P.Remote) is None
    assert time.monotonic() - start < PROMPT  # its end was announced, not found by a later look
    assert r.hget(task_key("n1"), "state") == b"done"
    # None from a local run is finished too
    assert q.query("n2", "q", {"action": "none"}, timeout=3, policy=P.Local) is None
    assert r.hget(task_key("n2"), "state") == b"done"


@pytest.mark.parametrize(
    ("params", "exc_type", "message"),
    [
        ({"action": "raise", "message": "kaboom 42"}, Boom, "kaboom 42"),
        ({"action": "no-such-action"}, ValueError, "unknown action 'no-such-action'"),
    ],
)
def test_remote_error_is_reraised_with_its_type_and_message(r, workers, params, exc_type, message):
    workers.start("q")
    q = make_queue(r)
    with pytest.raises(exc_type) as info:
        q.query("e1", "q", params, timeout=5, policy=P.Remote)
    assert type(info.value) is exc_type
    assert str(info.value) == message


def test_local_error_is_raised_as_itself(r):
    q = make_queue(r)
    with pytest.raises(Boom, match=r"^local boom$"):
        q.query("e2", "q", {"action": "raise", "message": "local boom"}, policy=P.Local)


def test_deadline_raises_task_timeout_promptly_while_the_task_runs(unpolled, workers):
    workers.start("q")
    q = make_queue(unpolled, interval=30)
    start = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        q.query("t1", "q", {"action": "sleep", "seconds": 30}, timeout=0.5, policy=P.Remote)
    assert isinstance(info.value, TimeoutError)
    assert 0.45 <= time.monotonic() - start < PROMPT  # at the deadline, not when the task or an interval ends


@pytest.mark.parametrize("attempt", range(3))
def test_deadline_raises_task_timeout_when_nobody_listens(unpolled, attempt):
    q = make_queue(unpolled, interval=30)
    start = time.monotonic()
    with pytest.raises(TaskTimeout):
        q.query(f"t2-{attempt}", "q", {"action": "echo"}, timeout=0.4, policy=P.Remote)
    assert 0.35 <= time.monotonic() - start < PROMPT


# -- records -----------------------------------------------------------------------------------


def test_once_deletes_the_task_data_after_reading(r, workers):
    workers.start("q")
    q = make_queue(r)
    assert q.query("kept", "q", {"action": "echo", "value": 1}, timeout=5, policy=P.Remote) == 1
    assert q.has_task("kept")
    assert q.query("gone", "q", {"action": "echo", "value": 2}, timeout=5, policy=P.Remote, once=True) == 2
    assert not q.has_task("gone")
    assert not r.exists(task_key("gone"), done_key("gone"))
    # get_task(once=True) reads, then deletes
    assert q.get_task("kept", once=True).result == 1
    assert not q.has_task("kept")
    assert q.get_task("kept") is None


def test_build_set_get_and_has_task(r):
    q = make_queue(r, timeout=30)
    task = q.build_task("b1", "q", {"x": [1, 2], "y": b"\x00\xff"})
    assert (task.id, task.name, task.params) == ("b1", "q", {"x": [1, 2], "y": b"\x00\xff"})
    assert task.expiry == pytest.approx(time.time() + 30, abs=2)
    assert task.result is None and task.error is None
    assert not q.has_task("b1")
    assert q.get_task("b1") is None

    assert q.set_task(task) == "b1"
    assert q.has_task("b1")
    assert 25_000 < r.pttl(task_key("b1")) <= 30_000
    got = q.get_task("b1")
    assert (got.id, got.name, got.params) == ("b1", "q", {"x": [1, 2], "y": b"\x00\xff"})
    assert got.expiry == pytest.approx(task.expiry, abs=0.01)

    got.update(3, 4)  # update() on a fetched task saves through set_task
    again = q.get_task("b1")
    assert (again.current_progress, again.total_progress) == (3, 4)
    task.result = "answer"
    task.save()  # build_task wires save() to this queue
    assert q.get_task("b1").result == "answer"


def test_task_data_expiry_follows_the_calls_timeout(r, workers, tmp_path):
    workers.start("q")
    q = make_queue(r, timeout=30)
    started, release = tmp_path / "started", tmp_path / "release"
    params = {"action": "touch_then_wait", "started": str(started), "path": str(release), "value": "ok"}
    short, long_, default = (q.build_task(i, "q", params) for i in ("ttl-15", "ttl-100", "ttl-default"))
    submitted = time.monotonic()
    q.submit(short, timeout=15)
    q.submit(long_, timeout=100)
    q.submit(default)
    wait_for(lambda: len(lines(started)) == 3, 10, "the three tasks to run")
    # Each lives for its own timeout from its submission, however long the machine took since.
    since = int((time.monotonic() - submitted) * 1000) + 1000
    assert 15_000 - since < r.pttl(task_key("ttl-15")) <= 15_000
    assert 100_000 - since < r.pttl(task_key("ttl-100")) <= 100_000
    assert 30_000 - since < r.pttl(task_key("ttl-default")) <= 30_000
    release.touch()
    assert [q.wait(t) for t in (short, long_, default)] == ["ok", "ok", "ok"]


def test_update_progress_is_visible_from_another_process_while_the_task_runs(r, workers, tmp_path):
    workers.start("q", task_fn="taskfns:progress_wait_task")
    q = make_queue(r)
    release = tmp_path / "release"
    task = q.build_task("p1", "q", {"current": 3, "total": 7, "path": str(release)})
    q.submit(task, timeout=20)
    seen = wait_for(
        lambda: (t := q.get_task("p1")) is not None and t.current_progress == 3 and t,
        10,
        "the worker's progress to show",
    )
    assert seen.total_progress == 7
    assert seen.update_progress_time > 0
    assert seen.result is None
    assert r.hget(task_key("p1"), "state") == b"running"
    release.touch()
    assert q.wait(task) == "finished"


def test_update_raises_timeout_error_once_the_task_expired_on_a_worker(r, workers, tmp_path):
    workers.start("q", task_fn="taskfns:update_until_expired_task")
    q = make_queue(r)
    report = tmp_path / "report"
    q.submit(q.build_task("x1", "q", {"path": str(report)}), timeout=0.6)
    wait_for(report.exists, 10, "the task to see its update() raise")
    kind, is_timeout, late = report.read_text().split("|")
    assert (kind, is_timeout) == ("TaskTimeout", "True")
    assert 0 <= float(late) < 5.0  # at its first update() past the deadline (one every 10 ms), not later


def test_update_raises_timeout_error_once_expired_locally(r):
    def task_fn(task: RedisTask) -> Any:
        while True:
            task.update(1, 2)

    q = make_queue(r, task_fn=task_fn)
    with pytest.raises(TimeoutError):
        q.query("x2", "q", None, timeout=0.2, policy=P.Local)
    with pytest.raises(TimeoutError):
        RedisTask("x3", "q", None, expiry=time.time() - 1).update(1, 2)


# -- reusing ids -------------------------------------------------------------------------------


def test_reusing_an_id_gets_no_stale_result_or_notification(r, workers):
    workers.start("q")
    q = make_queue(r)
    old = q.build_task("dup", "q", {"action": "echo", "value": "old"})
    q.submit(old, timeout=10)  # nobody waits: its notification stays in the done list
    wait_for(lambda: r.hget(task_key("dup"), "state") == b"done" and r.llen(done_key("dup")) == 1, 10, "old run")

    new = q.build_task("dup", "q", {"action": "sleep", "seconds": 0.5, "value": "new"})
    start = time.monotonic()
    q.submit(new, timeout=10)
    assert q.get_task("dup").result is None
    assert q.wait(new) == "new"
    assert time.monotonic() - start >= 0.45
    # and through query(), twice more
    assert q.query("dup", "q", {"action": "echo", "value": 3}, timeout=5, policy=P.Remote) == 3
    assert q.query("dup", "q", {"action": "none"}, timeout=5, policy=P.Remote) is None


def test_reusing_an_id_while_its_timed_out_run_still_runs(r, workers):
    """The abandoned first run ends while the second runs on the same worker: its result must
    not be taken for the second run's."""
    workers.start("q")
    q = make_queue(r)
    with pytest.raises(TaskTimeout):
        q.query("dup2", "q", {"action": "sleep", "seconds": 1.0, "value": "old"}, timeout=0.4, policy=P.Remote)
    result = q.query("dup2", "q", {"action": "sleep", "seconds": 1.5, "value": "new"}, timeout=10, policy=P.Remote)
    assert result == "new"


# -- clients with and without decode_responses ----------------------------------------------


BINARY = b"\x80\xff\x00 not utf-8"


def test_caller_with_decode_responses(redis_url, r, workers):
    proc = workers.start("q")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        q = make_queue(client, task_fn=local_pid)
        assert q.is_listened("q")
        assert q.query("d1", "q", {"action": "pid"}, timeout=5) == proc.pid  # Auto sees the marker
        assert q.query("d2", "q", {"action": "echo", "value": BINARY}, timeout=5, policy=P.Remote) == BINARY
        with pytest.raises(Boom, match="decoded"):
            q.query("d3", "q", {"action": "raise", "message": "decoded"}, timeout=5, policy=P.Remote)
        assert q.has_task("d2")
        assert q.get_task("d2").result == BINARY
    finally:
        client.close()


@pytest.mark.parametrize("listener_decodes", [True, False])
@pytest.mark.parametrize("caller_decodes", [True, False])
def test_listener_with_and_without_decode_responses(listeners, listener_decodes, caller_decodes):
    listeners.start(make_queue(listeners.client(decode_responses=listener_decodes)), ["q"])
    q = make_queue(listeners.client(decode_responses=caller_decodes), task_fn=local_raises)
    wait_for(lambda: q.is_listened("q"), 5, "the listener marker")
    assert q.query("d4", "q", {"action": "echo", "value": BINARY}, timeout=5) == BINARY
    assert q.query("d5", "q", {"action": "none"}, timeout=5, policy=P.Remote) is None
    with pytest.raises(Boom, match="decoded"):
        q.query("d6", "q", {"action": "raise", "message": "decoded"}, timeout=5, policy=P.Remote)


# -- listen() ----------------------------------------------------------------------------------


def test_listen_marks_the_queue_before_any_empty_wait(r, listeners):
    q = make_queue(listeners.client(socket_timeout=None), interval=30)
    start = time.monotonic()
    event, thread = listeners.start(q, ["m1", "m2"])
    wait_for(lambda: r.exists(listen_key("m1"), listen_key("m2")) == 2, 30, "both markers")
    assert time.monotonic() - start < PROMPT  # not after a first empty wait of `interval`
    assert 25_000 < r.pttl(listen_key("m1")) <= 30_000  # expires after the queue's timeout
    # stop without waiting out the 5 s blocking calls: wake them with ids that have no data
    event.set()
    r.rpush(queue_key("m1"), "wake")
    r.rpush(queue_key("m2"), "wake")
    thread.join(10)
    assert not thread.is_alive()


def test_markers_stay_fresh_while_every_slot_is_busy(r, workers, tmp_path):
    workers.start("q", args=("--timeout", "1", "--workers", "1"))
    q = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    task = q.build_task("busy", "q", {"action": "touch_then_wait", "started": str(started), "path": str(release)})
    q.submit(task, timeout=20)
    wait_for(started.exists, 10, "the task to start")
    hold(lambda: 0 < r.pttl(listen_key("q")) <= 1_000, 2.5, "the marker (1 s expiry) to stay set")
    release.touch()
    q.wait(task)


def test_listener_runs_up_to_workers_tasks_and_claims_no_more(r, workers, tmp_path):
    workers.start("q", args=("--workers", "2"))
    q = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    tasks = [
        q.build_task(
            f"c{i}", "q", {"action": "touch_then_wait", "started": str(started), "path": str(release), "value": i}
        )
        for i in range(5)
    ]
    for task in tasks:
        q.submit(task, timeout=20)
    wait_for(lambda: len(lines(started)) == 2, 10, "two tasks to run at once")
    hold(
        lambda: len(running_ids(r)) == 2 and r.llen(queue_key("q")) == 3 and len(lines(started)) == 2,
        1.0,
        "exactly 2 claimed and 3 still queued",
    )
    states = sorted(r.hget(task_key(t.id), "state") for t in tasks)
    assert states == [b"queued"] * 3 + [b"running"] * 2
    release.touch()
    assert [q.wait(t) for t in tasks] == list(range(5))
    assert len(lines(started)) == 5


def test_one_slot_serves_several_queues_one_task_at_a_time(r, workers, tmp_path):
    workers.start("a", "b", "c", args=("--workers", "1"))
    q = make_queue(r)
    started, release = tmp_path / "started", tmp_path / "release"
    tasks = [
        q.build_task(f"m{name}", name, {"action": "touch_then_wait", "started": str(started), "path": str(release)})
        for name in ("a", "b", "c")
    ]
    for task in tasks:
        q.submit(task, timeout=20)
    wait_for(lambda: len(lines(started)) == 1, 10, "one task to start")
    hold(lambda: len(running_ids(r)) == 1 and len(lines(started)) == 1, 1.0, "only one task claimed and running")
    release.touch()
    for task in tasks:
        q.wait(task)
    assert len(lines(started)) == 3  # every queue was served


def test_one_slot_takes_turns_between_its_queues(r, workers):
    """A slot freed by a claimer whose queue was empty goes to the queue that waited longest: with
    one slot on four queues, every queue's task is served within seconds, round after round (a
    claimer used to take its slot straight back, and a queue's task waited for its deadline)."""
    names = ("a", "b", "c", "d")
    workers.start(*names, args=("--workers", "1"))
    q = make_queue(r)
    for round_ in range(8):
        tasks = [q.build_task(f"turn{round_}{n}", n, {"action": "echo", "value": n}) for n in names]
        for task in tasks:
            q.submit(task, timeout=20)
        assert [q.wait(task) for task in tasks] == list(names), f"round {round_}"


def test_big_frames_live_in_keys_of_their_own_and_go_with_their_record(r, workers):
    """A payload of 1 MiB or more keeps its buffers under keys that expire; replacing the task
    (a reused id) or reading it once deletes them, and nothing of it is left behind. (Its buffers
    are each under 1 MiB: a bigger one goes by digest, see tests/test_digests.py.)"""
    np = pytest.importorskip("numpy")
    workers.start("q")
    q = make_queue(r)
    arr = np.arange(2**16, dtype=np.float64)  # 512 KiB, four of them: four extra frames each way
    for run in range(2):
        out = q.query("big", "q", {"action": "echo", "value": [arr + run + i for i in range(4)]}, policy=P.Remote)
        assert float(out[-1][-1]) == float(arr[-1]) + run + 3
        frames = sorted(k.decode() for k in r.scan_iter(match=f"{HEAD}task-result:big|*"))
        assert [f.split("|")[-1].split(".")[0] for f in frames] == ["params"] * 4 + ["result"] * 4, frames
        assert all(r.pttl(k) > 30_000 for k in frames)  # they outlive the record's deadline
        assert not [f for f in r.hkeys(task_key("big")) if f.count(b".") == 2]  # not inside the record
    assert float(q.get_task("big", once=True).result[-1][-1]) == float(arr[-1]) + 4
    assert not list(r.scan_iter(match=f"{HEAD}task-*:big*")), "record, done list, events or frames left"
    # Replaced by a small payload (which goes through submit.lua): the big frames go too.
    q.query("swap", "q", {"action": "echo", "value": [arr + i for i in range(4)]}, policy=P.Remote)
    assert list(r.scan_iter(match=f"{HEAD}task-result:swap|*"))
    assert q.query("swap", "q", {"action": "echo", "value": 1}, policy=P.Remote) == 1
    assert not list(r.scan_iter(match=f"{HEAD}task-result:swap|*"))


def test_listener_skips_ids_whose_data_expired(r, workers):
    q = make_queue(r)
    q.submit(q.build_task("stale", "q", {"action": "echo", "value": "stale"}), timeout=0.2)
    wait_for(lambda: not q.has_task("stale"), 5, "the stale task's data to expire")
    r.rpush(queue_key("q"), "ghost")  # an id that never had data
    assert r.lrange(queue_key("q"), 0, -1) == [b"stale", b"ghost"]

    workers.start("q", args=("--workers", "1"))
    assert q.query("fresh", "q", {"action": "echo", "value": "fresh"}, timeout=5, policy=P.Remote) == "fresh"
    assert r.llen(queue_key("q")) == 0
    assert running_ids(r) == []
    assert not r.exists(task_key("stale"), task_key("ghost"), done_key("stale"), done_key("ghost"))


def test_listen_returns_about_interval_after_its_event_is_set(listeners):
    q = make_queue(listeners.client(socket_timeout=None), interval=1)
    event, thread = listeners.start(q, ["q"])
    wait_for(lambda: q.is_listened("q"), 5, "the listener marker")
    assert q.query("s1", "q", {"action": "echo", "value": 1}, timeout=5, policy=P.Remote) == 1
    start = time.monotonic()
    event.set()
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - start < q.interval + 5.0  # its blocking calls end within `interval`


def test_listen_needs_a_task_fn(r):
    q = make_queue(r, task_fn=None)
    with pytest.raises(ValueError, match="task_fn"):
        q.listen(["q"], event=threading.Event())


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a|b", "|"])
def test_invalid_names_and_ids_are_refused(r, bad):
    q = make_queue(r)
    with pytest.raises(ValueError, match="queue name"):
        q.query("ok", bad, None, policy=P.Local)
    with pytest.raises(ValueError, match="task id"):
        q.query(bad, "ok", None, policy=P.Local)
    with pytest.raises(ValueError, match="queue name"):
        q.query("ok", bad, None, timeout=1, policy=P.Remote)
    with pytest.raises(ValueError, match="task id"):
        q.build_task(bad, "ok", None)
    with pytest.raises(ValueError, match="queue name"):
        q.set_queue_listened(bad)
    with pytest.raises(ValueError, match="queue name"):
        q.listen([bad], event=threading.Event())
    with pytest.raises(ValueError, match="prefix"):
        RedisTaskQueue(r, bad)
    with pytest.raises(ValueError, match="suffix"):
        RedisTaskQueue(r, "test", bad)
    assert r.dbsize() == 0  # nothing was written


# -- blocking waits and the client's socket timeout ------------------------------------------


def test_blocking_waits_stay_below_the_clients_socket_timeout(redis_url):
    """redis-py 8 gives every client a 5 s socket timeout even when the URL does not say so (older
    ones give none); a blocking call as long as `interval` (5 s by default) would die with TimeoutError."""
    for options in ({}, {"socket_timeout": 5.0}):
        client = redis.Redis.from_url(redis_url, **options)
        try:
            q = RedisTaskQueue(client, "test")
            effective = client.connection_pool.make_connection().socket_timeout
            if effective is None:  # redis-py < 8 and no timeout asked for: a blocking call cannot time out
                assert not options and int(redis.__version__.split(".")[0]) < 8, redis.__version__
                continue
            assert q.store.cap < effective
            assert q.store.cap < q.interval
        finally:
            client.close()


# -- fork safety -------------------------------------------------------------------------------


def test_a_forked_child_and_its_parent_use_one_queue_object_at_once(r, workers):
    # A notebook that forks (multiprocessing's default on Linux) copies the queue object with its
    # connections: the child must open its own, or the two would read each other's replies.
    workers.start("q", args=("--workers", "4"))
    q = make_queue(r)
    assert q.query("before-fork", "q", {"action": "echo", "value": -1}, policy=P.Remote) == -1
    channel = q.store.submitter.channel  # the connection the parent's submits went through
    parent_id = channel.execute("CLIENT", "ID")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, b"%d\n" % channel.execute("CLIENT", "ID"))
            got = [q.query(f"child-{i}", "q", {"action": "echo", "value": i}, policy=P.Remote) for i in range(40)]
            os.write(write, repr(got).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert int(pipe.readline()) != parent_id  # its own connection
        got = [q.query(f"parent-{i}", "q", {"action": "echo", "value": 100 + i}, policy=P.Remote) for i in range(40)]
        assert got == [100 + i for i in range(40)]
        assert pipe.read() == repr(list(range(40)))
    assert os.waitpid(child, 0)[1] == 0
    assert channel.execute("CLIENT", "ID") == parent_id  # and the parent kept its own
