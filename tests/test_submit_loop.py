"""A loop of ``Executor.submit`` calls does not wait for Redis between calls: it batches itself.

Each ``submit`` returns once its call is encoded and handed on (written at once when nothing
is in flight); calls made while a write is in flight leave together in the next one. What a
user notices: a loop of submits returns even while Redis holds back every write, the tasks are
queued in the order they were submitted, a submission Redis refuses fails its future, and a
script that exits right after its loop still stores every task.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import redis

import rtq
from conftest import ROOT, TESTS, Workers, child_env, in_thread, wait_for
from rtq.backend.keys import Keys
from rtq.errors import RedisFull, RtqConnectionError
from rtq.server import EmbeddedServer

K = Keys("test", "task-queue")


def make_queue(client: redis.Redis, **kwargs: Any) -> rtq.RedisTaskQueue:
    return rtq.RedisTaskQueue(client, "test", **{"timeout": 60, "interval": 0.5, **kwargs})


def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.timeout(120)
def test_a_submit_loop_goes_on_while_redis_holds_its_writes_back(r, workers):
    q = make_queue(r)
    ex = rtq.Executor(q, "loop", check_versions=False)
    r.client_pause(60_000, all=False)  # writes wait (reads go on) until unpaused
    try:
        loop = in_thread(lambda: [ex.submit(add, i, 1) for i in range(200)])
        # Every submit returned although none of them has been stored yet.
        wait_for(lambda: "at" in loop, 30, "the loop to return while Redis holds its writes back")
        futures = loop["value"]
        assert not any(r.exists(K.task(f.task_id)) for f in futures)
    finally:
        r.client_unpause()
    wait_for(lambda: r.llen(K.queue("loop")) == 200, 30, "the 200 tasks to be queued")
    assert [i.decode() for i in r.lrange(K.queue("loop"), 0, -1)] == [f.task_id for f in futures]  # in order
    workers.start("loop", task_fn=None)
    assert [f.result(60) for f in futures] == [i + 1 for i in range(200)]
    ex.shutdown()


@pytest.mark.timeout(60)
def test_a_submission_redis_refuses_fails_its_future():
    server = EmbeddedServer(args=("--maxmemory", "16mb", "--maxmemory-policy", "noeviction")).start()
    client = redis.Redis.from_url(server.url)
    try:
        ex = rtq.Executor(make_queue(client), "full", check_versions=False)
        client.config_set("maxmemory", 1)  # full for good
        futures = [ex.submit(add, i, 1) for i in range(5)]  # no submit raises: Redis answers later
        for fut in futures:
            with pytest.raises(RedisFull, match=r"Redis refused task \w+ in full for lack of memory: OOM command"):
                fut.result(30)
        assert client.llen(K.queue("full")) == 0
        # A lost server is noticed at the call itself when the call is written at once.
        server.stop()
        with pytest.raises(RtqConnectionError):
            ex.submit(add, 1, 1)
    finally:
        client.close()
        server.stop()


@pytest.mark.timeout(120)
def test_a_script_that_exits_right_after_its_loop_stores_every_task(redis_url, r):
    script = textwrap.dedent(
        f"""
        import redis, rtq
        q = rtq.RedisTaskQueue(redis.Redis.from_url({redis_url!r}), "test", timeout=60)
        ex = rtq.Executor(q, "later", check_versions=False)
        futures = [ex.submit(divmod, i, 7) for i in range(300)]
        print(futures[-1].task_id)
        """
    )
    env = child_env({"PYTHONPATH": f"{ROOT / 'src'}:{TESTS}"})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert r.llen(K.queue("later")) == 300  # nothing was left behind in the process
    pool = Workers(redis_url)
    try:
        pool.start("later", task_fn=None)
        last = done.stdout.strip()
        wait_for(lambda: r.hget(K.task(last), "state") == b"done", 60, "the last task to run")
    finally:
        pool.kill_all()
