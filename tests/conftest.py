"""Shared fixtures: a real Redis server for the session, real worker subprocesses per test.

The server is started through rtq's own embedded-server code path, on a free port, with no
persistence; ``RTQ_TEST_REDIS_URL`` runs the same suite against another server instead. Every
test starts on an empty database, and every worker a test starts is killed when it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from rtq.server import EmbeddedServer
from rtq.task_queue import RedisTaskQueue

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with its PYTHONPATH made absolute, for a child process.

    A kernel runs in the notebook's folder, a script in its own: with ``PYTHONPATH=src:tests``
    relative to the checkout they would import another installed rtq than the one under test
    (and the workers, started here, this one).
    """
    env = dict(os.environ if env is None else env)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p for p in env["PYTHONPATH"].split(os.pathsep))
    return env


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy, or fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def in_thread(fn: Callable[[], object]) -> dict[str, Any]:
    """Run ``fn`` in a daemon thread; the dict gets ``value`` or ``error``, ``at`` and ``thread``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        box["at"] = time.monotonic()

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("RTQ_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def server_version(redis_url: str) -> str:
    return str(redis.Redis.from_url(redis_url).info("server")["redis_version"])


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def queue(r: redis.Redis) -> RedisTaskQueue:
    """A queue with a short interval, so stop events and checks happen fast."""
    from taskfns import echo_task

    return RedisTaskQueue(r, "test", timeout=30, interval=0.5, task_fn=echo_task)


class Workers:
    """Starts ``rtq worker`` subprocesses and kills whatever is left at the end of the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self,
        *names: str,
        task_fn: str | None = "taskfns:echo_task",
        prefix: str = "test",
        wait: bool = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        timeout: float = 30,
    ) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "rtq", "worker", *names, "--url", self.url, "--prefix", prefix]
        cmd += ["--interval", "0.5", "--timeout", str(timeout)]
        if task_fn:
            cmd += ["--task-fn", task_fn]
        cmd += list(args)
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]), **(env or {})}
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        if wait:
            client = redis.Redis.from_url(self.url)
            wait_for(
                lambda: (
                    all(client.exists(f"{prefix}|task-queue|task-listen|{n}") for n in names) or proc.poll() is not None
                ),
                15,
                "the worker to listen",
            )
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def workers(redis_url: str, r: redis.Redis) -> Iterator[Workers]:
    pool = Workers(redis_url)
    yield pool
    pool.kill_all()


def fake_nvidia_smi(folder: Path, gpus: int) -> dict[str, str]:
    """An ``nvidia-smi`` that lists ``gpus`` GPUs, first on PATH: the env for a worker on a machine that has them."""
    script = folder / "nvidia-smi"
    listing = "".join(f"GPU {i}: Fake GPU (UUID: GPU-{i:08d}-fake)\\n" for i in range(gpus))
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}
