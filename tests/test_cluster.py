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
from conftest import ROOT, TESTS, in_thread, wait_for
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


class Counter:
    """An actor that says what each call saw before it."""

    def __init__(self) -> None:
        self.n = 0
        self.weights = bytearray(2 * 1024 * 1024)

    def add(self) -> tuple[int, int]:
        before = self.n
        self.n = before + 1
        return before, self.n

    def big(self) -> bytes:
        return bytes(3 * 1024 * 1024)  # large: held on the worker until its caller asks

    def wait(self, marker: str, seconds: float) -> str:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.01)
        return "finished"


def test_an_actor_on_a_cluster_runs_calls_in_order_and_is_lost_with_its_worker(cluster, procs, tmp_path):
    worker = start_worker(cluster.url, "act", prefix="actor", args=("--cluster", "--lease", "2"))
    procs.append(worker)
    q = rtq.connect(cluster.url, "actor", cluster=True, timeout=60, interval=0.5)
    with rtq.Executor(q, "act") as ex:
        counter = ex.actor(Counter)
        assert f":{worker.pid}:" in counter.session.worker
        calls = [counter.add() for _ in range(30)]
        assert [c.result(30) for c in calls] == [(i, i + 1) for i in range(30)]
        kept = counter.big()
        wait_for(lambda: counter.session.state().results, 30, "the record to list the held result")
        assert kept.result(30) == bytes(3 * 1024 * 1024)  # fetched from the actor through the cluster
        marker = tmp_path / "started"
        running = counter.wait(str(marker), 30)
        wait_for(marker.exists, 30, "the call to start")
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(rtq.errors.SessionLost, match="died"):
            running.result(30)
        assert time.monotonic() - killed < 10
        with pytest.raises(rtq.errors.SessionLost, match="died"):
            counter.add()


def test_a_buffer_sent_twice_on_a_cluster_goes_once(cluster, procs):
    import numpy

    procs.append(start_worker(cluster.url, "dig", prefix="digest", args=("--cluster",)))
    q = rtq.connect(cluster.url, "digest", cluster=True, timeout=60, interval=0.5)
    node = redis.Redis(host="127.0.0.1", port=cluster.node_of(q.keys.queue("dig")))
    data = numpy.random.default_rng(0).integers(0, 255, size=16 << 20, dtype=numpy.uint8)
    sent = []
    with rtq.Executor(q, "dig") as ex:
        for _ in range(2):
            before = int(node.info("stats")["total_net_input_bytes"])
            assert ex.submit(len, data).result(60) == 16 << 20
            sent.append(int(node.info("stats")["total_net_input_bytes"]) - before)
    assert sent[0] > 16 << 20 and sent[1] < 1 << 20, sent
    held = list(node.scan_iter(match=q.keys.blob_pattern()))
    assert len(held) == 1 and node.strlen(held[0]) == 16 << 20  # one copy, on the queue's node
    node.close()


def test_the_dashboard_and_rtq_status_show_an_actor_on_a_cluster(cluster, procs, tmp_path):
    from rtq.web.board import Board

    worker = start_worker(cluster.url, "dash", prefix="board", args=("--cluster",))
    procs.append(worker)
    q = rtq.connect(cluster.url, "board", cluster=True, timeout=60, interval=0.5)
    board = Board(q)
    assert board.where.startswith("cluster 127.0.0.1:")
    with rtq.Executor(q, "dash") as ex, ex.actor(Counter) as counter:
        flag = tmp_path / "go"
        running = ex.submit(progressfns.wait_for_file, str(flag), 60.0)
        wait_for(lambda: _state(q, running.task_id) == "running", 20, "the task to start")

        def shown() -> dict:
            board.refresh()
            return board.state()

        state = wait_for(lambda: (s := shown())["running"] and s["sessions"] and s, 30, "the board to show both")
        assert [w["pid"] for w in state["workers"]] == [worker.pid]
        assert [t["id"] for t in state["running"]] == [running.task_id]
        assert [s["id"] for s in state["sessions"]] == [counter.session.id]
        assert any(q["name"] == "dash" for q in state["queues"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
        cmd = [sys.executable, "-m", "rtq", "status", "--url", cluster.url, "--prefix", "board", "--cluster"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"sessions and actors (1):\n  actor 'Counter'  worker {counter.session.worker}" in done.stdout
        assert "weights (bytearray, 2.0 MiB)" in done.stdout, done.stdout
        flag.touch()
        assert running.result(30) is None


def test_a_local_worker_serves_a_cluster_queue(cluster):
    q = rtq.connect(cluster.url, "local", cluster=True, timeout=60, interval=0.5)
    with rtq.local_worker(q, "here", workers=1) as worker, rtq.Executor(q, "here") as ex:
        assert ex.submit(os.getpid).result(30) == worker.pid
        assert q.is_listened("here")
    assert not worker.running


def test_the_cell_magic_connects_to_a_cluster(cluster, procs):
    import nbformat
    from nbclient import NotebookClient

    from conftest import child_env

    procs.append(start_worker(cluster.url, "cells", prefix="magic", args=("--cluster",)))
    client = NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3", timeout=60, allow_errors=True)
    env = {k: v for k, v in child_env().items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET")}

    def run(source: str) -> tuple[str, list[str]]:
        cell = nbformat.v4.new_code_cell(source)
        client.nb.cells.append(cell)
        client.execute_cell(cell, len(client.nb.cells) - 1)
        out = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        out += "".join(o.data.get("text/plain", "") for o in cell.outputs if o.output_type == "execute_result")
        return out, [o.ename for o in cell.outputs if o.output_type == "error"]

    with client.setup_kernel(env=env):
        out, failed = run(f"%load_ext rtq\n%rtq connect --cluster {cluster.url} --prefix magic --queue cells")
        assert not failed and "live workers serve 'cells'" in out, out
        out, failed = run("%%rtq\nimport os\nwhere = os.getpid()")
        assert not failed, out
        out, failed = run("where")
        assert out.strip() == str(procs[0].pid), out
        out, failed = run("%rtq status")
        assert not failed and "workers (1):" in out, out


def asked(port: int) -> int:
    """How many ``ASKING`` commands the node at ``port`` has been sent."""
    node = redis.Redis(host="127.0.0.1", port=port)
    try:
        return int(node.info("commandstats").get("cmdstat_asking", {}).get("calls", 0))
    finally:
        node.close()


def test_a_queue_in_mid_migration_is_served_through_ask(cluster, procs):
    procs.append(start_worker(cluster.url, "q", prefix="ask", args=("--cluster", "--task-fn", "taskfns:echo_task")))
    procs.append(start_worker(cluster.url, "calls", prefix="ask", args=("--cluster",)))
    q = rtq.connect(cluster.url, "ask", cluster=True, timeout=60, interval=0.5)
    with rtq.Executor(q, "calls") as ex:  # shipped calls too: submit.lua, claims and outcomes on the held wire
        assert q.query("a1", "q", {"action": "echo", "value": 1}, policy=P.Remote) == 1
        assert ex.submit(pow, 2, 3).result(30) == 8
        key = q.keys.queue("q")
        before = cluster.node_of(key)
        target = next(p for p in cluster.ports if p != before)
        asked_before = asked(target)
        migration = cluster.begin_move(key, target)
        try:
            migration.move_keys()  # every key is on the importing node; the slot still belongs to the source
            assert migration.keys_at_source() == 0 and migration.keys_at_target() > 0
            # Each command meets ASK at the source and goes to the importing node with ASKING; one
            # that creates keys (a submit, a claim) is answered TRYAGAIN there until the slot has
            # moved, and waits for that.
            seeds = in_thread(
                lambda: [q.query(f"a{i}", "q", {"action": "echo", "value": i}, policy=P.Remote) for i in (2, 3)]
            )
            calls = in_thread(lambda: [ex.submit(pow, 2, i).result(30) for i in range(4)])
            wait_for(lambda: asked(target) > asked_before + 10, 20, "rtq to follow ASK to the importing node")
            assert "error" not in seeds and "error" not in calls  # waiting, not failed
        finally:
            migration.finish()
        wait_for(
            lambda: ("value" in seeds and "value" in calls) or "error" in seeds or "error" in calls, 30, "the calls"
        )
        assert seeds.get("value") == [2, 3], seeds
        assert calls.get("value") == [1, 2, 4, 8], calls
        assert cluster.node_of(key) == target and migration.keys_at_target() > 0
        assert q.query("a9", "q", {"action": "echo", "value": 9}, policy=P.Remote) == 9
    cluster.move_slot(key, before)
