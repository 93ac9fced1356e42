"""End-to-end smoke: a caller and a worker process meet through a real server."""

from __future__ import annotations

import time

import pytest

from rtq import TaskExecutePolicy
from taskfns import Boom


def test_remote_round_trip_returns_result_fast(queue, workers):
    workers.start("smoke")
    start = time.monotonic()
    result = queue.query("t1", "smoke", {"action": "echo", "value": 41}, policy=TaskExecutePolicy.Remote)
    assert result == 41
    # woken by the pushed notification, not after a polling interval
    assert time.monotonic() - start < queue.interval


def test_remote_error_keeps_type_and_message(queue, workers):
    workers.start("smoke")
    with pytest.raises(Boom, match="exploded"):
        queue.query("t2", "smoke", {"action": "raise", "message": "exploded"}, policy=TaskExecutePolicy.Remote)
