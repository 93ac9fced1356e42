"""End-to-end smoke: a caller and a worker process meet through a real server."""

from __future__ import annotations

import time

import pytest
import redis

import rtq.collector
from rtq import RedisTaskQueue, TaskExecutePolicy
from taskfns import Boom


def test_remote_round_trip_returns_result_fast(redis_url, r, workers, monkeypatch):
    # Without the push a caller would learn of the end at its next look: after `interval` (30 s
    # here, uncapped: no socket timeout), or at the collector's periodic check (made 60 s here).
    # "Fast" is then well before either, also on a loaded machine.
    monkeypatch.setattr(rtq.collector, "CHECK_PERIOD", 60.0)
    client = redis.Redis.from_url(redis_url, socket_timeout=None)
    queue = RedisTaskQueue(client, "test", timeout=60, interval=30)
    workers.start("smoke")
    start = time.monotonic()
    result = queue.query("t1", "smoke", {"action": "echo", "value": 41}, policy=TaskExecutePolicy.Remote)
    assert result == 41
    assert time.monotonic() - start < 10  # woken by the pushed notification, not after a polling interval
    client.close()


def test_remote_error_keeps_type_and_message(queue, workers):
    workers.start("smoke")
    with pytest.raises(Boom, match="exploded"):
        queue.query("t2", "smoke", {"action": "raise", "message": "exploded"}, policy=TaskExecutePolicy.Remote)
