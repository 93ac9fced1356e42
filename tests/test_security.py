"""Hostile input end to end: forged and garbage payloads, secrets, the secure default, ACL, TLS.

Everything here runs against real servers and real ``rtq worker`` processes. Forged payloads are
written straight into Redis, as anyone with write access could; a "marker" payload (one whose
unpickling calls ``os.mkdir``) stands for smuggled code, and the tests check its directory never
appears. Workers run shipped calls (``task_fn=None``), the default of ``rtq worker``.
"""

from __future__ import annotations

import ipaddress
import json
import operator
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy
import pytest
import redis

import rtq
from conftest import ROOT, TESTS, Workers, wait_for
from rtq import RedisTaskQueue, TaskExecutePolicy
from rtq.backend.keys import Keys
from rtq.calls import Call
from rtq.connection import is_local_url
from rtq.errors import RemoteTaskError, RtqConnectionError, SerializationError, SignatureError
from rtq.serialization import FLAG_SIGNED, MAC_SIZE, MAGIC, VERSION, Serializer
from rtq.server import EmbeddedServer, find_server_binary

REMOTE = TaskExecutePolicy.Remote
SECRET = "s3cret-only-for-tests"
KEYS = Keys("test", "task-queue")


@pytest.fixture(autouse=True)
def _no_inherited_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTQ_SECRET", raising=False)


class MakesDir:
    """Unpickling this calls ``os.mkdir(path)``: the stand-in for code smuggled into a payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def envelope(body: bytes, *, flags: int = 0, version: int = VERSION, mac: bytes = b"") -> bytes:
    """An envelope built by hand, as an attacker with write access to Redis would."""
    return MAGIC + struct.pack(">BBI", version, flags, 0) + mac + body


def client(r: redis.Redis, secret: str | None = SECRET, **kwargs: Any) -> RedisTaskQueue:
    return RedisTaskQueue(r, "test", timeout=30, interval=0.5, secret=secret, **kwargs)


def plant(r: redis.Redis, task_id: str, queue: str, **fields: Any) -> str:
    """Write a task record straight into Redis and queue its id; a field set to None is left out."""
    key = KEYS.task(task_id)
    record = {
        "name": queue,
        "expiry": repr(time.time() + 30),
        "token": "planted",
        "state": "queued",
        "notify": KEYS.done(task_id),
        "progress": "0 100 0",
        **fields,
    }
    r.hset(key, mapping={k: v for k, v in record.items() if v is not None})
    r.expire(key, 60)
    r.rpush(KEYS.queue(queue), task_id)
    return key


def ended(r: redis.Redis, task_id: str) -> bool:
    return r.hget(KEYS.task(task_id), "state") in (b"done", b"failed")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM a worker (it exits once idle) and return everything it logged."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


# -- 1. signatures, end to end -----------------------------------------------------------------
def test_worker_with_a_secret_never_unpickles_forged_payloads(tmp_path, r, workers):
    marker = tmp_path / "forged-code-ran"
    evil = pickle.dumps(MakesDir(marker), protocol=5)
    # Control: this payload does run code when loaded without verification.
    Serializer().loads([envelope(evil)], key="k", field="params")
    assert marker.exists()
    marker.rmdir()

    proc = workers.start("sec", task_fn=None, env={"RTQ_SECRET": SECRET})
    q = client(r)
    # A call signed with the right secret, for a task that never runs; the attacker copies it.
    signed_elsewhere = q.store.encode(
        KEYS.task("original"), "params", Call(os.mkdir, (str(marker),)), "t", "params"
    ).fields
    forged = {
        "unsigned": envelope(evil),
        "random-mac": envelope(evil, flags=FLAG_SIGNED, mac=os.urandom(MAC_SIZE)),
        "other-secret": Serializer("a-guess").dumps(MakesDir(marker), key=KEYS.task("other-secret"), field="params")[0],
        "copied": signed_elsewhere["params"],
    }
    for task_id, payload in forged.items():
        plant(r, task_id, "sec", params=payload)

    # Still serving: a signed call submitted after the forgeries runs.
    assert q.query("legit", "sec", Call(operator.add, (2, 3)), policy=REMOTE) == 5
    for task_id in forged:
        wait_for(lambda task_id=task_id: ended(r, task_id), 10, f"{task_id} to end")
        state, error = q.store.outcome(task_id)
        assert state == "failed" and isinstance(error, SignatureError), task_id
    assert not marker.exists(), "forged code ran on the worker"
    dead = {d["id"]: d["error"] for d in q.reaper.dead_letters()}
    assert set(dead) == set(forged) and all(e.startswith("SignatureError") for e in dead.values())

    assert proc.poll() is None
    log = stop(proc)
    for task_id in forged:
        assert re.search(rf"ERROR refused task {task_id} in sec: .*(not signed|bad signature)", log), log
    assert SECRET not in log


def test_caller_whose_payload_is_refused_gets_signature_error(r, workers):
    workers.start("sec", task_fn=None, env={"RTQ_SECRET": SECRET})
    with pytest.raises(SignatureError, match="is not signed"):
        client(r, secret=None).query("no-secret", "sec", Call(operator.add, (1, 1)), policy=REMOTE)
    with pytest.raises(SignatureError, match="bad signature"):
        client(r, secret="wrong-secret").query("wrong-secret", "sec", Call(operator.add, (1, 1)), policy=REMOTE)
    assert client(r).query("right-secret", "sec", Call(operator.add, (1, 1)), policy=REMOTE) == 2


def test_client_never_unpickles_a_forged_outcome(tmp_path, r):
    marker = tmp_path / "forged-code-ran"
    evil = pickle.dumps(MakesDir(marker), protocol=5)
    q = client(r)

    def submitted(task_id: str) -> Any:
        task = q.build_task(task_id, "nobody", Call(len, ("abc",)))
        q.submit(task)
        return task

    def finish(task_id: str, **fields: Any) -> None:  # what a forger writes instead of a worker
        r.hset(KEYS.task(task_id), mapping=fields)
        r.rpush(KEYS.done(task_id), task_id)

    result = submitted("forged-result")
    finish("forged-result", state="done", result=envelope(evil))
    with pytest.raises(SignatureError, match="forged-result \\[result\\] is not signed"):
        q.wait(result)
    with pytest.raises(SignatureError):
        q.get_task("forged-result")

    error = submitted("forged-error")
    text = json.dumps({"type": "Boom", "message": "trust me", "traceback": ""})
    finish(
        "forged-error",
        state="failed",
        error=envelope(evil, flags=FLAG_SIGNED, mac=os.urandom(MAC_SIZE)),
        error_text=text,
    )
    with pytest.raises(SignatureError, match="bad signature"):
        q.wait(error)

    garbage = submitted("garbage-error")  # the unsigned JSON text must not stand in for it
    finish("garbage-error", state="failed", error=b"garbage", error_text=text)
    with pytest.raises(SerializationError, match="not an rtq envelope") as info:
        q.wait(garbage)
    assert not isinstance(info.value, RemoteTaskError) and "trust me" not in str(info.value)

    copied = submitted("copied-result")
    genuine = q.store.encode(KEYS.task("another-task"), "result", 42, "t", "result").fields
    finish("copied-result", state="done", **genuine)
    with pytest.raises(SignatureError, match="bad signature"):
        q.wait(copied)
    assert not marker.exists(), "forged code ran on the client"

    # Control: a client without a secret trusts the same record, and the forged code runs.
    RedisTaskQueue(r, "test").get_task("forged-result")
    assert marker.exists()


def echo(value: Any) -> Any:
    return value


@pytest.mark.timeout(90)
def test_big_bytes_travel_signed_by_digest_and_a_tampered_one_is_refused(r, workers):
    q = client(r)
    # Submitted before any worker serves the queue, so the forger's edit comes first.
    data = bytes(range(256)) * (8 * 1024)  # 2 MiB
    task = q.build_task("tampered", "sec", Call(len, (data,)))
    q.submit(task)
    # The bytes are a buffer stored by its digest (tests/test_digests.py), not in the pickle.
    (stored,) = r.scan_iter(match=KEYS.blob_pattern())
    assert r.strlen(stored) == len(data) and len(r.hget(KEYS.task("tampered"), "params")) < 4096
    r.setrange(stored, 1000, b"\xff")  # one byte of the argument, as someone with write access could
    workers.start("sec", task_fn=None, env={"RTQ_SECRET": SECRET})
    with pytest.raises(SignatureError, match=r"tampered \[params\].*does not match the digest its signed payload"):
        q.wait(task)
    # Untouched, each bytes-like type makes the trip there and back as itself.
    with rtq.Executor(q, "sec") as ex:
        back = ex.submit(echo, [data, bytearray(data), memoryview(bytearray(data)).cast("I")]).result(60)
    assert [type(v) for v in back] == [bytes, bytearray, memoryview]
    assert back[0] == data and back[1] == data and back[2].format == "I" and back[2].tobytes() == data


MiB, TiB = 2**20, 2**40


def announcing(*sizes: int) -> bytes:
    """A signed-looking envelope (junk MAC) whose head announces buffers of ``sizes`` bytes."""
    head = MAGIC + struct.pack(">BBI", VERSION, FLAG_SIGNED, len(sizes)) + b"".join(struct.pack(">Q", s) for s in sizes)
    return head + os.urandom(MAC_SIZE) + pickle.dumps(None, protocol=5)


def peak_rss(pid: int) -> int:
    """The most memory process ``pid`` has held at once (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def expect(r: redis.Redis, task_id: str, seconds: float = 20) -> rtq.RedisTask:
    """The task planted as ``task_id``, as a caller waiting on it holds it."""
    return rtq.RedisTask(id=task_id, name="sec", params=None, expiry=time.time() + seconds)


@pytest.mark.timeout(90)
def test_sizes_a_forged_header_announces_cost_a_signed_worker_nothing(r, workers):
    proc = workers.start("sec", task_fn=None, env={"RTQ_SECRET": SECRET})
    q = client(r)
    assert q.query("warm-up", "sec", Call(operator.add, (1, 2)), policy=REMOTE) == 3
    before = peak_rss(proc.pid)
    # 300 MiB (under the payload limit) in 5 frames of which Redis holds a few bytes each, as keys
    # of their own and as fields of the record; and 1 TiB (16384 frames, all missing).
    plant(r, "holds-less", "sec", params=announcing(300 * MiB), **{"params#": "t 5 keys"})
    r.mset({KEYS.frame("holds-less", f"params.t.{i}"): b"junk" for i in range(5)})
    plant(r, "in-the-hash", "sec", params=announcing(300 * MiB), **{"params#": "t 5"})
    r.hset(KEYS.task("in-the-hash"), mapping={f"params.t.{i}": b"junk" for i in range(5)})
    plant(r, "a-terabyte", "sec", params=announcing(TiB), **{"params#": "t 16384 keys"})
    refusals = {
        "holds-less": r"is missing a frame, or one has the wrong size",
        "in-the-hash": r"is missing a frame, or one has the wrong size",
        "a-terabyte": r"claims 1024\.0 GiB, over the 400\.0 MiB payload limit",
    }
    for task_id, message in refusals.items():
        # The caller gets the refusal (not TaskTimeout, not MemoryError), naming the payload.
        with pytest.raises(SerializationError, match=message) as info:
            q.wait(expect(r, task_id))
        assert f"{KEYS.task(task_id)} [params]" in str(info.value)
        assert r.hget(KEYS.task(task_id), "attempt") == b"1"  # failed once, never claimed again
    grew = peak_rss(proc.pid) - before
    assert grew < 64 * MiB, f"the worker's peak memory grew by {grew / MiB:.0f} MiB"
    dead = [d["id"] for d in q.reaper.dead_letters()]
    assert sorted(dead) == sorted(refusals)
    assert q.query("after", "sec", Call(operator.add, (2, 3)), policy=REMOTE) == 5
    log = stop(proc)
    assert "Traceback" not in log and "MemoryError" not in log, log


def test_a_client_reading_a_forged_result_allocates_nothing_for_it(r):
    import tracemalloc

    q = client(r)
    for task_id, result, listed in [
        ("result-holds-less", announcing(300 * MiB), "a1 5 keys"),
        ("result-terabyte", announcing(TiB), "a1 16384 keys"),
    ]:
        task = q.build_task(task_id, "nobody", Call(len, ("abc",)))
        q.submit(task)
        r.hset(KEYS.task(task_id), mapping={"state": "done", "result": result, "result#": listed})
        r.rpush(KEYS.done(task_id), task_id)
        tracemalloc.start()
        try:
            with pytest.raises(SerializationError, match=f"{KEYS.task(task_id)} \\[result\\]"):
                q.wait(task)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * MiB, f"reading {task_id} allocated {peak / MiB:.0f} MiB"


def test_rotation_accepts_the_old_secret_and_signs_with_the_new(r, workers):
    workers.start("rot", task_fn=None, env={"RTQ_SECRET": "new-secret,old-secret"})
    old = client(r, secret="old-secret")
    old.submit(old.build_task("rot-1", "rot", Call(operator.mul, (6, 7))))
    wait_for(lambda: ended(r, "rot-1"), 10, "the old-signed task to end")
    key = KEYS.task("rot-1")
    assert r.hget(key, "state") == b"done"
    stored = [r.hget(key, "result")]
    assert Serializer("new-secret").loads(stored, key=key, field="result") == 42
    with pytest.raises(SignatureError):
        Serializer("old-secret").loads(stored, key=key, field="result")
    # Mid-rotation clients (signing old, accepting both) keep working.
    assert (
        client(r, secret="old-secret,new-secret").query("rot-2", "rot", Call(operator.mul, (6, 7)), policy=REMOTE) == 42
    )


# -- 2. the secure default ---------------------------------------------------------------------
PASSWORD = "pw-for-tests-only"


def _non_loopback_ipv4() -> str | None:
    candidates: list[str] = []
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        candidates += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            return candidate
    return None


@pytest.fixture(scope="module")
def lan_server() -> Iterator[tuple[str, int]]:
    """A password-protected server also listening on a non-loopback address of this machine."""
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind a server to")
    try:
        server = EmbeddedServer(args=("--bind", "127.0.0.1", ip)).start()
    except RtqConnectionError as exc:
        pytest.skip(f"cannot bind a server to {ip}: {exc}")
    with redis.Redis(port=server.port, password=server.password) as admin:  # its own random one gives way
        admin.config_set("requirepass", PASSWORD)
    yield ip, server.port
    server.stop()


def test_worker_refuses_a_remote_redis_without_a_secret_and_says_why(lan_server):
    ip, port = lan_server
    url = f"redis://:{PASSWORD}@{ip}:{port}/0"
    env = {k: v for k, v in os.environ.items() if k != "RTQ_SECRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT / "src")])
    for task_fn in ([], ["--task-fn", "taskfns:echo_task"]):  # params are pickles either way
        done = subprocess.run(
            [sys.executable, "-m", "rtq", "worker", "gpu", "--url", url, "--prefix", "lan", *task_fn],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert "refusing to serve" in done.stderr and "not on this machine" in done.stderr
        assert "RTQ_SECRET" in done.stderr and "--insecure" in done.stderr
        assert f":***@{ip}" in done.stderr and PASSWORD not in done.stderr
    assert not redis.Redis.from_url(url).exists(Keys("lan", "task-queue").listen("gpu"))


def test_worker_serves_a_remote_redis_with_a_secret_or_insecure(lan_server):
    ip, port = lan_server
    url = f"redis://:{PASSWORD}@{ip}:{port}/0"
    pool = Workers(url)
    try:
        pool.start("signed", task_fn=None, prefix="lan", env={"RTQ_SECRET": SECRET})
        q = rtq.connect(url, prefix="lan", secret=SECRET, interval=0.5)
        assert q.query("lan-1", "signed", Call(operator.add, (1, 2)), policy=REMOTE) == 3
        pool.start("open", task_fn=None, prefix="lan", env={"RTQ_SECRET": ""}, args=("--insecure",))
        insecure = rtq.connect(url, prefix="lan", interval=0.5)
        assert insecure.query("lan-2", "open", Call(operator.add, (2, 2)), policy=REMOTE) == 4
    finally:
        pool.kill_all()


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://127.8.9.10:6379", True),
        ("redis://localhost:6379", True),
        ("rediss://user:pw@localhost:6380/1", True),
        ("redis://[::1]:6379", True),
        ("unix:///tmp/redis.sock", True),
        ("redis://192.0.2.7:6379", False),
        ("redis://10.0.0.1:6379", False),
        ("redis://redis.example.com:6379", False),
        ("redis://127.evil.example.com:6379", False),
        ("redis://[fd00::2]:6379", False),
    ],
)
def test_what_counts_as_this_machine(url, local):
    assert is_local_url(url) is local


# -- 3. auth and TLS through the URL -----------------------------------------------------------
def test_password_in_the_url(lan_server):
    _, port = lan_server
    q = rtq.connect(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", prefix="pw")
    assert q.redis.ping()
    for bad in (f"redis://:not-the-{PASSWORD}@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
        with pytest.raises(RtqConnectionError) as info:
            rtq.connect(bad)
        assert "not-the" not in str(info.value)


ACL_USER = "rtq-test-worker"
ACL_PASSWORD = "acl-pw-for-tests-only"
# The rule the README shows, for the prefix "test".
ACL_RULE = (
    "on",
    f">{ACL_PASSWORD}",
    "resetkeys",
    "~test|*",
    "resetchannels",
    "-@all",
    "+@read",
    "+@write",
    "+@scripting",
    "+@transaction",
    "+@connection",
    "-@dangerous",
)


@pytest.fixture
def acl_url(r: redis.Redis, redis_url: str) -> Iterator[str]:
    try:
        r.execute_command("ACL", "SETUSER", ACL_USER, "reset", *ACL_RULE)
    except redis.ResponseError as exc:
        pytest.skip(f"this server does not let the tests create ACL users: {exc}")
    r.acl_log_reset()
    parts = urlsplit(redis_url)
    yield parts._replace(netloc=f"{ACL_USER}:{ACL_PASSWORD}@{parts.hostname}:{parts.port}").geturl()
    r.execute_command("ACL", "DELUSER", ACL_USER)


def test_acl_user_confined_to_its_prefix_runs_a_full_round_trip(acl_url, r):
    def reports_progress() -> str:
        task = rtq.current_task()
        task.update(1, 2)
        return "reported"

    pool = Workers(acl_url)
    try:
        worker = pool.start("acl", task_fn=None, env={"RTQ_SECRET": SECRET})
        q = rtq.connect(acl_url, prefix="test", secret=SECRET, interval=0.5, timeout=30)
        assert q.query("acl-1", "acl", Call(operator.add, (2, 3)), policy=REMOTE) == 5
        with pytest.raises(ZeroDivisionError):
            q.query("acl-2", "acl", Call(operator.truediv, (1, 0)), policy=REMOTE)
        assert q.query("acl-3", "acl", Call(reports_progress), policy=REMOTE) == "reported"
        assert q.get_task("acl-1").result == 5 and q.has_task("acl-2")
        assert q.cancel("acl-3") == "done"
        from rtq.status import gather_status

        assert gather_status(q)["workers"]
        stop(worker)  # a graceful exit deletes the worker's records, as this user
        assert not r.exists(KEYS.listen("acl"))
    finally:
        pool.kill_all()
    # The worker's start-up look at the eviction settings (INFO memory) is @dangerous: it is
    # refused, and the worker does without it. Nothing else may be.
    denied = [e for e in r.acl_log() if e.get("username") == ACL_USER and e.get("object") != "info"]
    assert denied == [], f"the ACL rule is missing something rtq needs: {denied}"

    # ... and the same user cannot touch anything outside its prefix.
    r.set("outside", "x")
    c = redis.Redis.from_url(acl_url)
    attempts = {
        "GET": lambda: c.get("outside"),
        "SET": lambda: c.set("outside", "y"),
        "DEL": lambda: c.delete("outside"),
        "EVAL on a key": lambda: c.eval("return redis.call('SET', KEYS[1], 'y')", 1, "outside"),
        "EVAL sneaking a key": lambda: c.eval("return redis.call('SET', 'outside', 'y')", 0),
        "FLUSHDB": lambda: c.flushdb(),
        "KEYS": lambda: c.keys("*"),
        "CONFIG": lambda: c.config_set("dir", "/tmp"),
        "another prefix": lambda: rtq.connect(acl_url, prefix="other").submit(
            RedisTaskQueue(c, "other").build_task("x", "acl", 1)
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(redis.ResponseError, match=r"(?i)noperm|permission|can.t access") as info:
            attempt()
        assert info.value is not None, what
    assert r.get("outside") == b"x" and not list(r.scan_iter(match="other|*"))
    c.close()


def _tls_binaries() -> list[str]:
    found: list[str] = []
    for get in (find_server_binary, lambda: shutil.which("valkey-server"), lambda: shutil.which("redis-server")):
        try:
            binary = get()
        except RtqConnectionError:
            continue
        if binary and binary not in found:
            found.append(binary)
    return found


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A TLS-only server (no plain port) with a self-signed certificate made for this test."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    tried = []
    for binary in _tls_binaries():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(cert),
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"rediss://localhost:{port}/0"
        probe = redis.Redis.from_url(url, ssl_ca_certs=str(cert), socket_connect_timeout=1)

        def up(probe: redis.Redis = probe, proc: subprocess.Popen[str] = proc) -> bool:
            if proc.poll() is not None:
                return True
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 15, f"{binary} to serve TLS")
        probe.close()
        if proc.poll() is None:
            try:
                yield url, str(cert)
            finally:
                proc.terminate()
                proc.communicate(timeout=10)
            return
        tried.append(f"{binary}: {proc.communicate()[0].strip().splitlines()[-1:]}")
    pytest.skip(f"no server binary here supports TLS: {tried}")


def test_rediss_url_round_trip(tls_server):
    url, ca = tls_server
    pool = Workers(f"{url}?ssl_ca_certs={quote(ca)}")  # a worker takes TLS options in its URL
    try:
        pool.start("tls", task_fn=None, prefix="tls")
        q = rtq.connect(url, prefix="tls", ssl_ca_certs=ca, interval=0.5)
        assert q.query("tls-1", "tls", Call(operator.add, (20, 22)), policy=REMOTE) == 42
    finally:
        pool.kill_all()
    with pytest.raises(RtqConnectionError, match=r"(?i)certificate"):
        rtq.connect(url)  # a self-signed certificate is not trusted unless named
    with pytest.raises(RtqConnectionError):
        rtq.connect(url.replace("rediss://", "redis://"), socket_timeout=2)  # no plain-text port


# -- 4. bad input ------------------------------------------------------------------------------
def test_unpicklable_argument_fails_at_submit_naming_it_and_writes_nothing(r):
    q = client(r, secret=None)
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=re.escape("cannot ship args[0]: _thread.lock cannot be pickled")):
        q.query("u-1", "gpu", Call(print, (lock,)), policy=REMOTE)
    with pytest.raises(SerializationError, match=re.escape("cannot ship kwargs['state']['lock']: _thread.lock")):
        q.submit(q.build_task("u-2", "gpu", Call(print, (), {"state": {"lock": lock}})))
    assert r.dbsize() == 0


def test_unpicklable_result_reaches_the_caller_as_serialization_error(r, workers):
    proc = workers.start("bad", task_fn=None)

    def returns_a_lock() -> Any:
        import threading

        return {"lock": threading.Lock()}

    q = client(r, secret=None)
    with pytest.raises(
        SerializationError, match=re.escape("cannot ship result['lock']: _thread.lock cannot be pickled")
    ):
        q.query("res-1", "bad", Call(returns_a_lock), policy=REMOTE)
    assert q.query("res-2", "bad", Call(operator.add, (1, 1)), policy=REMOTE) == 2
    assert proc.poll() is None


def test_exception_that_cannot_travel_becomes_remote_task_error(r, workers):
    workers.start("bad", task_fn=None, env={"RTQ_SECRET": SECRET})
    q = client(r)

    def raises_unpicklable() -> None:
        import threading

        class HoldsALock(Exception):
            def __init__(self, message: str) -> None:
                super().__init__(message)
                self.lock = threading.Lock()

        raise HoldsALock("held a lock")

    def raises_unrebuildable() -> None:
        class NeedsTwo(Exception):  # pickles fine, but cannot be rebuilt from its args
            def __init__(self, a: str, b: str) -> None:
                super().__init__(f"{a} and {b}")

        raise NeedsTwo("this", "that")

    for task_id, fn, type_name, message in [
        ("exc-1", raises_unpicklable, "HoldsALock", "held a lock"),
        ("exc-2", raises_unrebuildable, "NeedsTwo", "this and that"),
    ]:
        with pytest.raises(RemoteTaskError) as info:
            q.query(task_id, "bad", Call(fn), policy=REMOTE)
        err = info.value
        assert err.type_name.endswith(f".{type_name}") and err.message == message
        assert f"in {fn.__name__}" in err.remote_traceback
        assert f"{type_name}: {message}" in err.remote_traceback and "Remote traceback" in str(err)


def test_garbage_in_redis_is_logged_and_the_worker_keeps_serving(r, workers):
    proc = workers.start("junk", task_fn=None)
    q = client(r, secret=None)
    sound = envelope(pickle.dumps(Call(operator.add, (1, 1)), protocol=5))
    one_frame = Serializer().dumps(
        Call(len, (pickle.PickleBuffer(bytearray(10)),)), key=KEYS.task("lost-frame"), field="params"
    )[0]
    failing = {
        "garbage": ({"params": b"\x00\xffnot an envelope"}, "is not an rtq envelope \\(bad magic\\)"),
        "truncated": ({"params": MAGIC + b"\x01"}, "is not an rtq envelope \\(too short\\)"),
        "missing": ({"params": None}, "no payload stored"),
        "version": (
            {"params": envelope(pickle.dumps(1), version=9)},
            "envelope version 9; this rtq reads versions 1 and 2",
        ),
        "not-a-pickle": ({"params": envelope(b"\x80\x05junk")}, "cannot be unpickled here"),
        "bad-frames": ({"params": sound, "params#": "nonsense"}, "malformed frame list"),
        "huge-frames": ({"params": sound, "params#": "t 1000000000000"}, "lists 1000000000000 frames"),
        # A big payload whose frame (stored under a key of its own) is gone.
        "lost-frame": ({"params": one_frame, "params#": "t 1 keys"}, "missing a frame"),
        "bad-name": ({"params": sound, "name": b"\xff\xfe"}, "malformed fields"),
    }
    for task_id, (fields, _) in failing.items():
        plant(r, task_id, "junk", **fields)
    plant(r, "bad-expiry", "junk", params=sound, expiry="soon")
    plant(r, "no-frames", "junk", params=sound, **{"params#": "t 0 keys"})  # an empty list: nothing to read

    assert q.query("after", "junk", Call(operator.add, (3, 4)), policy=REMOTE) == 7
    wait_for(lambda: ended(r, "no-frames"), 10, "no-frames to end")
    assert q.store.outcome("no-frames") == ("done", 2)
    for task_id, (_, message) in failing.items():
        wait_for(lambda task_id=task_id: ended(r, task_id), 10, f"{task_id} to end")
        state, error = q.store.outcome(task_id)
        assert state == "failed" and isinstance(error, SerializationError), task_id
        assert re.search(message, str(error)), (task_id, str(error))
    # Unreadable deadline: skipped, never run, and no longer held by the worker.
    assert r.hget(KEYS.task("bad-expiry"), "state") == b"queued"
    assert not any(r.lrange(k, 0, -1) for k in r.scan_iter(match=KEYS.running("*")))
    assert proc.poll() is None
    log = stop(proc)
    for task_id in failing:
        assert f"refused task {task_id} in" in log, log
    assert "Traceback" not in log


def test_payload_over_the_limit_fails_at_submit(r, redis_url):
    for q in (
        client(r, secret=None, max_payload=64 * 1024),
        rtq.connect(redis_url, prefix="test", max_payload=64 * 1024),
    ):
        for big in (b"x" * 100_000, numpy.zeros(100_000, dtype="u1")):
            with pytest.raises(
                SerializationError, match=r"params is 9\d\.\d KiB pickled, over the 64\.0 KiB payload limit"
            ):
                q.query("big", "gpu", Call(len, (big,)), policy=REMOTE)
    assert r.dbsize() == 0


@pytest.mark.parametrize("bad", ["", "a|b"])
def test_invalid_names_raise_value_error_at_the_call(r, redis_url, bad):
    q = client(r, secret=None, task_fn=lambda task: None)
    stopped = threading.Event()
    stopped.set()
    calls = {
        "task id": lambda: q.query(bad, "gpu", 1, policy=REMOTE),
        "queue name": lambda: q.query("id", bad, 1, policy=REMOTE),
        "build_task": lambda: q.build_task(bad, "gpu", 1),
        "prefix": lambda: RedisTaskQueue(r, bad),
        "suffix": lambda: RedisTaskQueue(r, "p", bad),
        "set_queue_listened": lambda: q.set_queue_listened(bad),
        "listen": lambda: q.listen(["ok", bad], event=stopped),
        "connect": lambda: rtq.connect(redis_url, prefix=bad),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"must not (be empty|contain the key separator '\|')"):
            call()
        assert r.dbsize() == 0, what
    done = subprocess.run(
        [sys.executable, "-m", "rtq", "worker", bad, "--url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "queue name" in done.stderr and "must not" in done.stderr
