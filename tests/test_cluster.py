"""Redis Cluster (issue 21): a three-master cluster the tests start, workers with ``--cluster``.

Every key of one prefix shares the hash tag ``{prefix}``, so one node serves a whole queue:
scripts, transactions and rtq's own wire path work there; different prefixes land on
different nodes; a slot moved away (resharding) is followed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

import progressfns
import rtq
from conftest import ROOT, TESTS, wait_for
from rtq import TaskExecutePolicy as P
from rtq.watch import watch
from topologies import REDIS_SERVER, Cluster, start_worker, stop_workers, supports, valkey_server

pytestmark = pytest.mark.timeout(90)

BINARIES = {"redis": REDIS_SERVER, "valkey": valkey_server()}


@pytest.fixture(scope="session", params=sorted(BINARIES))
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    binary = BINARIES[request.param]
    why = supports(binary, "--cluster-enabled")
    if why:
        pytest.skip(f"no Redis Cluster: {why}")
    deployment = Cluster(binary)
    try:
        yield deployment.start()
    finally:
        deployment.stop()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    stop_workers(started)


def two_prefixes_on_two_nodes(cluster: Cluster) -> tuple[str, str]:
    """Two prefixes whose queues two different masters serve."""
    first = "alpha"
    node = cluster.node_of("{alpha}")
    other = next(p for p in (f"beta{i}" for i in range(100)) if cluster.node_of("{" + p + "}") != node)
    return first, other


def test_a_prefix_is_one_slot_and_prefixes_spread_over_the_nodes(cluster):
    a, b = two_prefixes_on_two_nodes(cluster)
    qa, qb = rtq.connect(cluster.url, a, cluster=True), rtq.connect(cluster.url, b, cluster=True)
    assert qa.keys.queue("q") == "{" + a + "}|task-queue|task-queue|q"  # the layout, with the tag
    for q in (qa, qb):
        task = q.build_task("t1", "q", {"big": "x" * 10})
        q.set_task(task)
        assert q.get_task("t1").params == {"big": "x" * 10}
    holder_a, holder_b = (redis.Redis(host="127.0.0.1", port=cluster.node_of("{" + p + "}")) for p in (a, b))
    # Each master holds its queue's record (and would answer MOVED for the other's).
    assert holder_a.exists(qa.keys.task("t1")) and holder_b.exists(qb.keys.task("t1"))
    assert holder_a.connection_pool.connection_kwargs["port"] != holder_b.connection_pool.connection_kwargs["port"]


@pytest.mark.parametrize("decode", [False, True])
def test_the_seed_api_runs_every_policy_on_a_cluster_client(cluster, procs, decode):
    prefix = f"seed{int(decode)}"
    worker = start_worker(cluster.url, "q", prefix=prefix, args=("--cluster", "--task-fn", "taskfns:echo_task"))
    procs.append(worker)
    from taskfns import Boom, echo_task

    client = redis.RedisCluster.from_url(cluster.url, decode_responses=decode)
    q = rtq.RedisTaskQueue(client, prefix, timeout=30, interval=0.5, task_fn=echo_task)
    here = os.getpid()
    assert q.query("p-local", "q", {"action": "pid"}, policy=P.Local) == here
    assert q.query("p-remote", "q", {"action": "pid"}, policy=P.Remote) == worker.pid
    assert q.query("p-auto", "q", {"action": "pid"}, policy=P.Auto) == worker.pid
    assert q.query("p-remote-first", "q", {"action": "pid"}, policy=P.RemoteFirst) == worker.pid
    assert q.query("p-local-first", "q", {"action": "pid"}, policy=P.LocalFirst) == here
    with pytest.raises(Boom, match="broke"):
        q.query("p-raise", "q", {"action": "raise", "message": "broke"}, policy=P.Remote)
    task = q.build_task("p-seed", "q", {"action": "echo", "value": [1, 2]})
    assert q.execute_task_remotely(task) == [1, 2]
    assert q.get_task("p-seed").result == [1, 2] and q.has_task("p-seed")


def test_executor_round_trips_progress_output_and_cancel(cluster, procs, tmp_path):
    procs.append(start_worker(cluster.url, "gpu", prefix="ex", args=("--cluster", "--workers", "4")))
    q = rtq.connect(cluster.url, "ex", cluster=True, timeout=60, interval=0.5)
    with rtq.Executor(q, "gpu") as ex:
        assert list(ex.map(pow, range(20), [2] * 20)) == [i * i for i in range(20)]
        scale = 3
        assert ex.submit(lambda x: x * scale, 14).result(30) == 42  # a closure shipped by value

        flag = tmp_path / "go"
        fut = ex.submit(progressfns.ticking_until, str(flag), 5)
        seen: list[tuple[str, str]] = []

        def on_output(stream: str, text: str) -> None:
            seen.append((stream, text))
            flag.touch()  # its output reached us while it runs: let it go on

        assert watch(fut, on_output=on_output, timeout=30) == "done"
        assert fut.result(10) == 5 and fut.progress == (5, 5)
        assert "tick" in "".join(t for s, t in seen if s == "stdout")
        assert "work done" in "".join(t for s, t in seen if s == "stdout")

        running = ex.submit(progressfns.wait_for_file, str(tmp_path / "never"), 60.0)
        wait_for(lambda: _state(q, running.task_id) == "running", 20, "the task to start")
        started = time.monotonic()
        assert running.stop()  # cancel.lua on the queue's node; the worker stops the task
        with pytest.raises(rtq.errors.TaskCancelled):
            running.result(20)
        assert time.monotonic() - started < 20

        gate = tmp_path / "gate"
        blockers = [ex.submit(progressfns.wait_for_file, str(gate), 30.0) for _ in range(4)]  # every slot busy
        wait_for(lambda: all(_state(q, b.task_id) == "running" for b in blockers), 20, "every slot to be busy")
        queued = ex.submit(pow, 2, 5)
        assert queued.cancel() and queued.cancelled()
        gate.touch()
        assert [b.result(30) for b in blockers] == [None] * 4


def _state(q: rtq.RedisTaskQueue, task_id: str) -> str:
    state = q.store.redis.hget(q.keys.task(task_id), "state")
    return state.decode() if state else ""


def test_a_killed_workers_task_is_run_by_another(cluster, procs, tmp_path):
    a = start_worker(cluster.url, "q", prefix="crash", args=("--cluster", "--task-fn", "taskfns:echo_task"))
    procs.append(a)
    q = rtq.connect(cluster.url, "crash", cluster=True, timeout=60, interval=0.5)
    started, release = tmp_path / "started", tmp_path / "release"
    task = q.build_task("k1", "q", {"action": "touch_then_wait", "started": str(started), "path": str(release)})
    box = {}
    import threading

    threading.Thread(target=lambda: box.setdefault("v", q.execute_task_remotely(task)), daemon=True).start()
    wait_for(lambda: started.exists() and started.read_text().split() == [str(a.pid)], 20, "worker A to start it")
    os.kill(a.pid, signal.SIGKILL)
    a.wait(10)
    release.touch()
    b = start_worker(cluster.url, "q", prefix="crash", args=("--cluster", "--task-fn", "taskfns:echo_task"))
    procs.append(b)
    wait_for(lambda: "v" in box, 30, "the task to be run again")
    assert box["v"] == b.pid
    assert started.read_text().split() == [str(a.pid), str(b.pid)]


def test_rtq_status_cluster_lists_the_worker_and_its_queue(cluster, procs):
    worker = start_worker(cluster.url, "stat", prefix="st", args=("--cluster",))
    procs.append(worker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    cmd = [sys.executable, "-m", "rtq", "status", "--url", cluster.url, "--prefix", "st"]
    done = subprocess.run([*cmd, "--cluster"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "workers (1):" in done.stdout and f":{worker.pid}:" in done.stdout
    assert "stat" in done.stdout


def test_a_resharded_queue_is_followed_to_its_new_node(cluster, procs):
    procs.append(start_worker(cluster.url, "q", prefix="move", args=("--cluster", "--task-fn", "taskfns:echo_task")))
    q = rtq.connect(cluster.url, "move", cluster=True, timeout=60, interval=0.5)
    assert q.query("m1", "q", {"action": "echo", "value": 1}, policy=P.Remote) == 1
    key = q.keys.queue("q")
    before = cluster.node_of(key)
    target = next(p for p in cluster.ports if p != before)
    cluster.move_slot(key, target)
    assert cluster.node_of(key) == target
    # The worker, the waiting client and the submitting one all learn the new node from MOVED.
    started = time.monotonic()
    assert [q.query(f"m{i}", "q", {"action": "echo", "value": i}, policy=P.Remote) for i in range(2, 6)] == [2, 3, 4, 5]
    assert time.monotonic() - started < 30
    assert redis.Redis(host="127.0.0.1", port=target).exists(q.keys.listen("q"))  # markers are there too
    cluster.move_slot(key, before)  # back where it was, for the other tests
