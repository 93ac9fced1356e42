"""The embedded server, ``rtq.connect()`` without a URL, and ``rtq demo`` end to end."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

import rtq
import rtq.server
from conftest import ROOT, wait_for
from rtq.server import EmbeddedServer

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_embedded_server_runs_without_persistence_and_stops_cleanly():
    with EmbeddedServer() as server:
        assert server.running
        assert urlsplit(server.url).hostname == "127.0.0.1"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.ping()
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            client.set("k", "v")
            assert client.get("k") == "v"
        finally:
            client.close()
        process, folder, port = server.process, Path(server.dir.name), server.port
        assert folder.is_dir()
    assert not server.running
    assert process.poll() is not None  # the child has exited and was reaped
    assert not folder.exists()  # its temporary files are gone
    assert not port_open(port)
    server.stop()  # stopping twice is harmless


def test_embedded_server_stops_at_interpreter_exit():
    code = "from rtq.server import EmbeddedServer; s = EmbeddedServer().start(); print(s.port, flush=True)"
    out = subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    port = int(out.stdout.split()[0])
    wait_for(lambda: not port_open(port), 10, "the server to stop with its interpreter")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_embedded_server_stops_when_its_parent_is_killed():
    code = (
        "import sys; from rtq.server import EmbeddedServer; s = EmbeddedServer().start(); "
        "print(s.port, flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], env=CHILD_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(parent.stdout.readline())
        assert port_open(port)
        parent.kill()  # SIGKILL: no atexit runs
        parent.wait(10)
        wait_for(lambda: not port_open(port), 10, "the orphaned server to stop")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        parent.stdin.close()
        parent.stdout.close()


@pytest.fixture
def fresh_default_server(monkeypatch) -> Iterator[None]:
    """No RTQ_REDIS_URL and no embedded server started yet; stops whatever a test starts."""
    monkeypatch.delenv("RTQ_REDIS_URL", raising=False)
    monkeypatch.setattr(rtq.server, "_default", None)
    yield
    if rtq.server._default is not None:
        rtq.server._default.stop()


def test_connect_without_url_uses_the_embedded_server(fresh_default_server):
    q = rtq.connect(prefix="emb")
    server = rtq.server._default
    assert server is not None and server.running
    assert q.redis.connection_pool.connection_kwargs["port"] == server.port
    q.set_queue_listened("jobs")
    assert q.is_listened("jobs")
    assert server.process is not None
    with redis.Redis(port=server.port) as raw:
        assert raw.exists("emb|task-queue|task-listen|jobs")
    # a second connect() shares the same server
    assert rtq.connect(prefix="emb").redis.connection_pool.connection_kwargs["port"] == server.port
    # the queue works end to end on it (locally: no worker here)
    q.task_fn = lambda task: task.params * 2
    assert q.query("t1", "jobs2", 21) == 42


def test_connect_uses_rtq_redis_url_when_set(fresh_default_server, monkeypatch, redis_url, r):
    monkeypatch.setenv("RTQ_REDIS_URL", redis_url)
    q = rtq.connect(prefix="env")
    assert q.redis.connection_pool.connection_kwargs["port"] == urlsplit(redis_url).port
    assert rtq.server._default is None  # no embedded server was started
    q.set_queue_listened("jobs")
    assert r.exists("env|task-queue|task-listen|jobs")


def test_rtq_demo_runs_end_to_end():
    env = {k: v for k, v in CHILD_ENV.items() if k != "RTQ_REDIS_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "rtq", "demo", "--tasks", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # the summary table: the closure capturing a variable ran, the one failing on purpose failed
    assert "4 jobs on 2 workers" in out.stdout
    assert re.search(r"captures learning_rate  ok +[0-9.]+  0\.\d+", out.stdout)
    assert re.search(r"fails on purpose +FAILED +[0-9.]+  ZeroDivisionError", out.stdout)
