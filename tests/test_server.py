"""The embedded server, ``rtq.connect()`` without a URL, and ``rtq demo`` end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
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
    with redis.Redis(port=server.port, password=server.password) as raw:  # a URL built by hand needs it too
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


# -- private to the user who started it ---------------------------------------------------------
def test_embedded_server_refuses_clients_without_its_password():
    with EmbeddedServer() as server:
        assert server.password and server.password in server.url
        assert server.password not in repr(server) and str(server.port) in repr(server)
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        for password in (None, "not-" + server.password):
            with redis.Redis(port=server.port, password=password) as stranger:
                with pytest.raises(redis.AuthenticationError):
                    stranger.set("planted", "pickle")
        # Through rtq, a URL without the password is refused with a clear error.
        with pytest.raises(rtq.errors.RtqConnectionError, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
            rtq.connect(f"redis://127.0.0.1:{server.port}/0")
        with redis.Redis.from_url(server.url) as client:
            assert not client.exists("planted")


def _interpreter_for(uid: int, gid: int) -> str | None:
    """A Python that user ``uid`` may run (the test's own may sit in a folder only root enters)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if not candidate:
            continue
        try:
            ran = subprocess.run(
                [candidate, "-I", "-c", "pass"], user=uid, group=gid, extra_groups=[], capture_output=True, timeout=30
            )
        except OSError:
            continue
        if ran.returncode == 0:
            return candidate
    return None


# Run as another user: what it can reach of the server, and of the worker's secrets.
_STRANGER = """
import json, os, socket, sys

args = json.loads(sys.argv[1])
seen = {}
with socket.create_connection(("127.0.0.1", args["port"]), timeout=10) as sock:
    for name, command in (("ping", b"PING\\r\\n"), ("set", b"SET planted pickle\\r\\n")):
        sock.sendall(command)
        seen[name] = sock.recv(200).decode(errors="replace")
for name, path in args["paths"].items():
    try:
        with open(path, "rb") as fh:
            seen[name] = fh.read().decode(errors="replace")
    except OSError as exc:
        seen[name] = type(exc).__name__
try:
    seen["folder"] = os.listdir(args["folder"])
except OSError as exc:
    seen["folder"] = type(exc).__name__
print(json.dumps(seen))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root, to run a check as another uid")
def test_another_local_user_cannot_reach_the_server_or_read_its_password(fresh_default_server):
    """The shared-notebook-host attack: another user on this machine tries the server's port."""
    import pwd  # Unix only

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this machine has no user 'nobody' to run the check as")
    python = _interpreter_for(nobody.pw_uid, nobody.pw_gid)
    if python is None:
        pytest.skip("no Python interpreter here that user 'nobody' may run")
    q = rtq.connect(prefix="uid")  # no URL: the embedded server, as in a notebook
    server = rtq.server._default
    assert server is not None and server.process is not None and server.dir is not None
    with rtq.local_worker(q, "uid") as worker:
        helper = wait_for(lambda: _helper_pid(q, worker.pid), 30, "the worker's heartbeat helper")
        paths = {
            "server cmdline": f"/proc/{server.process.pid}/cmdline",
            "worker cmdline": f"/proc/{worker.pid}/cmdline",
            "helper cmdline": f"/proc/{helper}/cmdline",
            "server config": str(Path(server.dir.name) / "server.conf"),
            "server log": str(Path(server.dir.name) / "server.log"),
            "worker environ": f"/proc/{worker.pid}/environ",
            "helper environ": f"/proc/{helper}/environ",
        }
        args = json.dumps({"port": server.port, "paths": paths, "folder": server.dir.name})
        ran = subprocess.run(
            [python, "-I", "-c", _STRANGER, args],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        seen = json.loads(ran.stdout)
        assert seen["ping"].startswith("-NOAUTH"), seen
        assert seen["set"].startswith("-NOAUTH"), seen
        for name in ("server cmdline", "worker cmdline", "helper cmdline"):  # readable by all, and clean
            assert seen[name] not in ("PermissionError", "FileNotFoundError") and server.password not in seen[name]
        for name in ("server config", "server log", "worker environ", "helper environ", "folder"):
            assert seen[name] == "PermissionError", (name, seen[name])
        assert not q.redis.exists("planted")
        # This user's worker got the password through its environment, not its arguments.
        assert server.password in Path(f"/proc/{worker.pid}/environ").read_text(errors="replace")
        with rtq.Executor(q, "uid") as ex:  # and the owner's own work runs as ever
            assert ex.submit(lambda: 6 * 7).result(30) == 42


def _helper_pid(q: rtq.RedisTaskQueue, pid: int) -> int | None:
    """The heartbeat helper's pid from the worker record of process ``pid``."""
    for wid in q.redis.zrange(q.keys.workers(), 0, -1):
        raw = q.redis.get(q.keys.worker(wid.decode()))
        if raw and json.loads(raw).get("pid") == pid:
            return json.loads(raw).get("heartbeat_pid")  # type: ignore[no-any-return]
    return None


@pytest.mark.timeout(90)
def test_rtq_server_hands_out_a_url_with_its_password(tmp_path):
    """``rtq server`` prints the URL to give workers; with ``--url-file`` only that file holds it."""
    url_file = tmp_path / "url"
    for args in ((), ("--url-file", str(url_file))):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtq", "server", *args],
            env=CHILD_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if args:
                assert re.fullmatch(r"rtq server: redis://:\*\*\*@127\.0\.0\.1:\d+/0  \(the URL .* is in .*\)\n", first)
                assert url_file.stat().st_mode & 0o777 == 0o600
                url = url_file.read_text().strip()
                assert urlsplit(url).password and urlsplit(url).password not in first
            else:
                url = first.removeprefix("rtq server: ").strip()
                assert urlsplit(url).password, first
                note = proc.stdout.readline() + proc.stdout.readline()
                assert f"export RTQ_REDIS_URL={url}" in note and "password" in note, note
            with redis.Redis.from_url(url) as client:
                assert client.ping()
            with redis.Redis(port=urlsplit(url).port) as stranger, pytest.raises(redis.AuthenticationError):
                stranger.ping()
        finally:
            proc.terminate()
            rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
    assert not url_file.exists()  # gone with the server it opened
