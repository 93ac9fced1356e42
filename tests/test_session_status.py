"""``rtq status`` lists the sessions and actors live workers hold, from a real worker's records."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

import rtq
from conftest import ROOT, Workers, child_env, wait_for
from rtq.task_queue import RedisTaskQueue

pytestmark = pytest.mark.timeout(120)


class Holder:
    """An actor holding 3 MiB, and able to make a large result it keeps until asked."""

    def __init__(self) -> None:
        self.weights = bytearray(3 * 1024 * 1024)

    def big(self) -> bytes:
        return bytes(2 * 1024 * 1024)


def _status(redis_url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "rtq", "status", "--url", redis_url, "--prefix", "test"],
        env={**child_env(), "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rtq_status_lists_each_actor_with_where_it_lives_and_what_it_holds(
    r: redis.Redis, workers: Workers, redis_url: str
) -> None:
    workers.start("stat", task_fn=None, args=("--lease", "2"))
    ex = rtq.Executor(RedisTaskQueue(r, "test", timeout=60, interval=0.5), "stat")
    assert "sessions and actors (0):" in _status(redis_url)
    with ex.actor(Holder) as holder:
        kept = holder.big()
        wait_for(kept.done, 30, "the call to end")
        wait_for(lambda: holder.session.state().results, 30, "the record to list the kept result")
        line = f"  actor 'Holder'  worker {holder.session.worker} on {holder.session.host}  age "
        # Workers announce what they hold in their heartbeat record: the next beat lists it.
        wait_for(lambda: "sessions and actors (1):\n" + line in _status(redis_url), 30, "rtq status to list the actor")
        out = _status(redis_url)
        assert "sessions and actors (1):\n" + line in out, out
        assert "idle " in out and "calls 1" in out, out
        assert "holds: weights (bytearray, 3.0 MiB)" in out, out
        assert "results kept until asked for: 1 (2.0 MiB)" in out, out
    wait_for(lambda: "sessions and actors (0):" in _status(redis_url), 30, "the closed actor to leave the list")
