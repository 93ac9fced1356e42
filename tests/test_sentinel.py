"""Sentinel (issue 21): a master, a replica and three sentinels the tests start; failovers.

Redis replicates asynchronously, so a failover may lose what the old master acknowledged last.
What rtq promises across one: every caller gets its result or ``TaskLost`` within seconds (none
waits for its deadline), workers go on serving on the new master, and with ``durable=True`` no
acknowledged task is lost.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

import rtq
from conftest import wait_for
from rtq.errors import NotReplicated, RtqConnectionError, TaskLost
from topologies import REDIS_SERVER, Sentinels, start_worker, stop_workers, supports

pytestmark = pytest.mark.timeout(180)

FAILOVERS = int(os.environ.get("RTQ_TEST_FAILOVERS", "1"))
"""Failovers the durable test goes through (each waits for the sentinels to allow the next)."""
SETTLE_S = 20.0
"""Most seconds after a failover before every caller has its answer."""


@pytest.fixture(scope="module")
def sentinels() -> Iterator[Sentinels]:
    why = supports(REDIS_SERVER, "--sentinel")
    if why:
        pytest.skip(f"no Sentinel: {why}")
    deployment = Sentinels(REDIS_SERVER)
    try:
        yield deployment.start()
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def two_workers(sentinels: Sentinels) -> Iterator[list[subprocess.Popen[str]]]:
    # One finds the sentinels from --url, the other from RTQ_REDIS_URL.
    procs = [
        start_worker(sentinels.url, "default", prefix="sen", args=("--workers", "8")),
        start_worker(sentinels.url, "default", prefix="sen", args=("--workers", "8", "--durable"), from_env=True),
    ]
    queue = rtq.connect(sentinels.url, "sen")
    wait_for(lambda: len(queue.live_workers()) == 2, 20, "both workers to hold a lease")
    yield procs
    stop_workers(procs)


def across(
    queue: rtq.RedisTaskQueue, failover: Callable[[], int], tasks: int = 200
) -> tuple[int, int, list[BaseException], float]:
    """Submit ``tasks`` no-op-ish calls, half of them before ``failover()`` and half after.

    A submit that meets the failover itself (its connection cut by the sentinels, or the old
    master turned replica) raises ``RtqConnectionError``, or fails its future with it (a call
    sent ahead): not acknowledged, the caller knows. Returns (results, TaskLost, other errors,
    seconds from the failover until all settled) of the others.
    """
    with rtq.Executor(queue, "default") as ex:
        futs = [ex.submit(time.sleep, 0.01) for _ in range(tasks // 2)]
        failover()
        failed_over = time.monotonic()
        for _ in range(tasks - tasks // 2):
            try:
                futs.append(ex.submit(time.sleep, 0.01))
            except RtqConnectionError:
                continue
        _, pending = wait(futs, timeout=SETTLE_S + 10)
        settled = time.monotonic() - failed_over
        assert not pending, f"{len(pending)} calls still waiting {settled:.0f} s after the failover"
        # A call sent ahead (Executor.submit does not wait for Redis) whose write met the
        # failover fails its future with RtqConnectionError: not acknowledged either.
        refused = [f for f in futs if isinstance(f.exception(), RtqConnectionError)]
        futs = [f for f in futs if f not in refused]
        errors = [f.exception() for f in futs if f.exception() is not None]
        lost = sum(isinstance(e, TaskLost) for e in errors)
        assert serves(ex)  # the workers serve the new master
    return len(futs) - len(errors), lost, [e for e in errors if not isinstance(e, TaskLost)], settled


def serves(ex: rtq.Executor) -> bool:
    """Whether a new call runs; a submit refused by a connection still held to the old master
    (one per held connection: it is dropped then) is sent again, a few times at most."""
    for _ in range(16):
        try:
            return bool(ex.submit(pow, 2, 10).result(SETTLE_S) == 1024)
        except RtqConnectionError:  # not acknowledged, and said so
            continue
    return False


def test_a_sentinel_url_reaches_the_master(sentinels, two_workers):
    queue = rtq.connect(sentinels.url, "sen", timeout=60, interval=0.5)
    assert "sentinel mymaster" in repr(queue)
    with rtq.Executor(queue, "default") as ex:
        assert ex.submit(divmod, 7, 2).result(30) == (3, 1)
    assert len(queue.live_workers()) == 2


def test_calls_across_a_sentinel_failover_end_within_seconds(sentinels, two_workers):
    queue = rtq.connect(sentinels.url, "sen", timeout=60, interval=0.5)
    ok, _, other, settled = across(queue, sentinels.failover)
    assert other == []
    assert ok >= 50  # at least the calls submitted once the new master serves
    assert settled < SETTLE_S  # nobody waited for the 60 s deadline


def test_calls_across_a_killed_master_end_within_seconds(sentinels, two_workers):
    queue = rtq.connect(sentinels.url, "sen", timeout=60, interval=0.5)
    ok, _, other, settled = across(queue, sentinels.kill_master)
    assert other == []
    assert ok >= 50  # at least the calls submitted once the new master serves
    assert settled < SETTLE_S


def test_durable_loses_no_acknowledged_task_across_failovers(sentinels, two_workers):
    queue = rtq.connect(sentinels.url, "sen", timeout=60, interval=0.5, durable=True)
    acknowledged, lost, refused = 0, 0, 0

    def submit(ex: rtq.Executor) -> object:
        try:
            return ex.submit(time.sleep, 0.01)
        except (NotReplicated, RtqConnectionError) as exc:
            return exc  # not acknowledged: its caller knows it may be gone

    with rtq.Executor(queue, "default") as ex, ThreadPoolExecutor(16) as pool:
        for _ in range(FAILOVERS):
            first = [pool.submit(submit, ex) for _ in range(16)]
            sentinels.failover()  # while those submits are under way
            then = [pool.submit(submit, ex) for _ in range(16)]
            results = [f.result(30) for f in (*first, *then)]
            futs = [r for r in results if not isinstance(r, Exception)]
            refused += len(results) - len(futs)
            _, pending = wait(futs, timeout=SETTLE_S + 10)  # type: ignore[arg-type]
            assert not pending
            acknowledged += len(futs)
            lost += sum(isinstance(f.exception(), TaskLost) for f in futs)  # type: ignore[union-attr]
    assert acknowledged >= 16 * FAILOVERS, (
        f"only {acknowledged} of {32 * FAILOVERS} submits acknowledged ({refused} refused)"
    )
    assert lost == 0


def test_a_local_worker_reaches_the_master_through_the_sentinels(sentinels):
    queue = rtq.connect(sentinels.url, "senlocal", timeout=60, interval=0.5)
    with rtq.local_worker(queue, "here", workers=1) as worker, rtq.Executor(queue, "here") as ex:
        assert worker.url.startswith("redis+sentinel://127.0.0.1:")
        assert ex.submit(os.getpid).result(30) == worker.pid
