"""Large actor results stay on the worker until their caller asks (``rtq.worker.held``), real workers.

What crosses the network is measured on the server itself (``INFO stats``: the bytes Redis
received), so a value sent back before it was asked for fails the test whatever the code does.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
import redis

import rtq
from conftest import Workers, wait_for
from rtq.errors import SessionLost
from rtq.task_queue import RedisTaskQueue

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


class Maker:
    """Makes big and small values, printing and reporting progress as it goes."""

    def big(self, mib: int, seed: int = 7) -> np.ndarray:
        rtq.current_task().update(1, 2)
        print("making", mib, "MiB")
        return np.random.default_rng(seed).integers(0, 255, size=mib * MIB, dtype=np.uint8)

    def small(self) -> np.ndarray:
        return np.arange(10)

    def blob(self, mib: int) -> bytes:
        return bytes(range(256)) * (mib * MIB // 256)


def _received(r: redis.Redis) -> int:
    return int(r.info("stats")["total_net_input_bytes"])


def _actor(r: redis.Redis, workers: Workers, name: str) -> rtq.Actor:
    """A ``Maker`` on a worker of its own queue (a worker an earlier test left behind is never chosen)."""
    workers.start(name, task_fn=None, args=("--lease", "2"))
    ex = rtq.Executor(RedisTaskQueue(r, "test", timeout=60, interval=0.5), name)
    return ex.actor(Maker)


def _held(actor: rtq.Actor) -> list[list[object]]:
    return actor.session.state().results


def test_a_64_mib_result_crosses_the_network_only_when_asked_for(r: redis.Redis, workers: Workers) -> None:
    actor = _actor(r, workers, "held-big")
    before = _received(r)
    fut = actor.big(64)
    wait_for(fut.done, 60, "the call to end")
    assert fut.exception() is None
    assert fut.progress == (1.0, 2.0)  # progress still reaches the caller
    held = _held(actor)
    assert [row[0] for row in held] == [fut.task_id]  # the record says: ready, held
    assert held[0][2] == 64 * MIB
    assert _received(r) - before < MIB, "the value was sent before anyone asked for it"

    value = fut.result(60)
    assert _received(r) - before >= 64 * MIB  # now it came
    expected = np.random.default_rng(7).integers(0, 255, size=64 * MIB, dtype=np.uint8)
    assert np.array_equal(value, expected)
    assert fut.result(10) is value  # fetched once; a second result() gives the same object
    wait_for(lambda: _held(actor) == [], 30, "the worker to free what it sent")
    actor.close()


def test_small_results_come_back_with_the_call(r: redis.Redis, workers: Workers) -> None:
    actor = _actor(r, workers, "held-small")
    fut = actor.small()
    assert list(fut.result(30)) == list(range(10))
    assert _held(actor) == []
    assert actor.blob(2).result(30) == bytes(range(256)) * (2 * MIB // 256)  # bytes, held then fetched
    actor.close()


def test_a_dropped_future_frees_its_held_value(r: redis.Redis, workers: Workers) -> None:
    actor = _actor(r, workers, "held-gc")
    fut = actor.big(4)
    wait_for(fut.done, 60, "the call to end")
    assert len(_held(actor)) == 1
    before = _received(r)
    del fut
    gc.collect()
    assert list(actor.small().result(30)) == list(range(10))  # the next call says it is gone
    assert _held(actor) == []
    assert _received(r) - before < MIB
    actor.close()


def test_asyncio_wrap_future_gets_a_held_value(r: redis.Redis, workers: Workers) -> None:
    actor = _actor(r, workers, "held-async")

    async def main() -> np.ndarray:
        return await asyncio.wait_for(asyncio.wrap_future(actor.big(2, seed=3)), 60)

    value = asyncio.run(main())
    assert np.array_equal(value, np.random.default_rng(3).integers(0, 255, size=2 * MIB, dtype=np.uint8))
    actor.close()


def test_a_held_value_goes_with_its_actor(r: redis.Redis, workers: Workers) -> None:
    actor = _actor(r, workers, "held-close")
    fut = actor.big(2)
    wait_for(fut.done, 60, "the call to end")
    actor.close()
    with pytest.raises(SessionLost, match="Maker"):
        fut.result(30)
