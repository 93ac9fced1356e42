"""Data travels once: big buffers go by digest when Redis already holds them (PRODUCT.md section 13).

Every measure is the server's own: ``INFO stats`` counts the bytes clients sent it
(``total_net_input_bytes``) and the bytes it sent back (``total_net_output_bytes``), and the
digest keys are read as they are. Workers are real ``rtq worker`` processes.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import subprocess
import sys
import threading
from typing import Any

import numpy
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtq
from conftest import ROOT, TESTS, wait_for
from rtq import RedisTaskQueue
from rtq.backend.keys import Keys
from rtq.calls import Call
from rtq.errors import SerializationError, SignatureError
from rtq.status import format_status, gather_status

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
KEYS = Keys("test", "task-queue")
SECRET = "digests-secret-for-tests"


@pytest.fixture(autouse=True)
def _no_inherited_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTQ_SECRET", raising=False)


def sent_to_redis(r: redis.Redis) -> int:
    return int(r.info("stats")["total_net_input_bytes"])


def sent_by_redis(r: redis.Redis) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


def blob_keys(r: redis.Redis) -> dict[bytes, int]:
    """Every digest key of the test namespace with the bytes it holds."""
    return {k: int(r.strlen(k)) for k in r.scan_iter(match=KEYS.blob_pattern(), count=1000)}


def array(mib: int, seed: int = 0) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 255, size=mib * MiB, dtype=numpy.uint8)


def executor(r: redis.Redis, secret: str | None = None, **kwargs: Any) -> rtq.Executor:
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5, secret=secret, **kwargs)
    return rtq.Executor(queue, "dig")


# -- sent once -------------------------------------------------------------------------------
def test_the_same_array_submitted_twice_is_sent_once_and_stored_once(r, workers):
    workers.start("dig", task_fn=None)
    data = array(64)
    with executor(r) as ex:
        before = sent_to_redis(r)
        assert ex.submit(len, data).result(timeout=60) == 64 * MiB
        first = sent_to_redis(r) - before
        before = sent_to_redis(r)
        assert ex.submit(len, data).result(timeout=60) == 64 * MiB
        second = sent_to_redis(r) - before
    assert first > 64 * MiB, first
    assert second < MiB, f"the second submit sent {second} bytes"
    held = blob_keys(r)
    assert sum(held.values()) == 64 * MiB and len(held) == 1, held  # one copy
    # A different array is a different buffer: it is sent.
    with executor(r) as ex:
        before = sent_to_redis(r)
        assert ex.submit(len, array(2, seed=1)).result(timeout=60) == 2 * MiB
        assert sent_to_redis(r) - before > 2 * MiB
    assert len(blob_keys(r)) == 2


def test_a_result_returned_twice_is_sent_once(r, workers):
    workers.start("dig", task_fn=None)
    with executor(r) as ex:
        values = []
        for _ in range(2):
            before = sent_to_redis(r)
            values.append(ex.submit(numpy.ones, 16 * MiB, numpy.uint8).result(timeout=60))
            values.append(sent_to_redis(r) - before)
    first, first_sent, second, second_sent = values
    assert first.nbytes == second.nbytes == 16 * MiB and (second == 1).all()
    assert first_sent > 16 * MiB and second_sent < MiB, values[1::2]
    assert second.flags.writeable  # a result is the caller's own array


def test_a_task_that_writes_into_its_argument_changes_its_own_copy_only(r, workers):
    workers.start("dig", task_fn=None)
    data = numpy.zeros(4 * MiB, numpy.uint8)
    with executor(r) as ex:
        assert ex.submit(_fill_and_sum, data).result(timeout=60) == 4 * MiB
        # Served from the worker's cache the second time: still zeros, whatever the first task did.
        assert ex.submit(_fill_and_sum, data).result(timeout=60) == 4 * MiB


def test_a_raw_buffer_given_to_a_task_can_be_returned_from_the_cache_too(r, workers):
    import pickle

    workers.start("dig", task_fn=None)
    data = bytearray(os.urandom(2 * MiB))
    with executor(r) as ex:
        for _ in range(2):  # read from Redis, then from the worker's cache
            back = ex.submit(_same, pickle.PickleBuffer(data)).result(timeout=60)
            assert bytes(back) == bytes(data)


def _same(value: Any) -> Any:
    return value


def _made(size: int) -> bytes:
    return numpy.random.default_rng(size).bytes(size)


def test_a_bytes_result_is_read_straight_into_the_bytes_object_it_comes_back_as(r, workers):
    import tracemalloc

    workers.start("dig", task_fn=None)
    size = 32 * MiB
    with executor(r) as ex:
        assert len(ex.submit(_made, MiB).result(timeout=60)) == MiB  # connections and code warmed up
        tracemalloc.start()
        try:
            back = ex.submit(_made, size).result(timeout=60)  # made on the worker: all the caller holds is this
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert type(back) is bytes and back == _made(size)
    # Read into a bytearray, then copied into the bytes object, it would take twice its size.
    assert peak < 1.5 * size, f"reading a {size >> 20} MiB bytes result took {peak / MiB:.0f} MiB at its peak"


def _kind_and_id(value: Any) -> tuple[str, int, bool, str]:
    import hashlib

    writable = not memoryview(value).readonly
    return type(value).__name__, id(value), writable, hashlib.sha256(value).hexdigest()


def _zero_and_sum(values: numpy.ndarray) -> int:
    values[:] = 0
    return int(values.sum())


def _fill_and_sum(values: numpy.ndarray) -> int:
    total = int(values.sum())
    values += 1
    return int(values.sum()) - total


# -- the worker's cache ----------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["0", "64M"])
def test_with_a_cache_the_second_task_reads_nothing_from_redis(r, workers, cache):
    workers.start("dig", task_fn=None, args=("--cache-bytes", cache))
    data = array(16)
    with executor(r) as ex:
        assert ex.submit(len, data).result(timeout=60) == 16 * MiB
        before = sent_by_redis(r)
        assert ex.submit(len, data).result(timeout=60) == 16 * MiB
        read = sent_by_redis(r) - before
    if cache == "0":
        assert read > 16 * MiB, f"without a cache the worker read only {read} bytes"
    else:
        assert read < MiB, f"with a cache the worker still read {read} bytes"


def test_the_cache_gives_a_bytes_argument_as_itself_and_the_same_bytes_as_an_array_a_copy(r, workers):
    workers.start("dig", task_fn=None, args=("--workers", "1"))
    data = numpy.random.default_rng(7).bytes(4 * MiB)
    with executor(r) as ex:
        first = ex.submit(_kind_and_id, data).result(timeout=60)
        before = sent_by_redis(r)
        second = ex.submit(_kind_and_id, data).result(timeout=60)
        assert sent_by_redis(r) - before < MiB  # from the cache
        assert first[0] == second[0] == "bytes" and first[1] == second[1]  # the very same immutable object
        # The same bytes as an array: a writable copy of its own, the cached bytes untouched.
        as_array = numpy.frombuffer(data, numpy.uint8).copy()
        assert ex.submit(_zero_and_sum, as_array).result(timeout=60) == 0
        assert ex.submit(_kind_and_id, data).result(timeout=60) == first
        assert first[3] == hashlib.sha256(data).hexdigest()
        # An array cached first, then its bytes as bytes: read from the cache into a new bytes object.
        other = array(4, seed=8)
        assert ex.submit(_zero_and_sum, other).result(timeout=60) == 0
        kind, _, writable, digest = ex.submit(_kind_and_id, other.tobytes()).result(timeout=60)
        assert (kind, writable, digest) == ("bytes", False, hashlib.sha256(other).hexdigest())


def test_cache_bytes_must_be_a_size(redis_url):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-m", "rtq", "worker", "q", "--url", redis_url, "--cache-bytes", "lots"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--cache-bytes: must be a number of bytes" in proc.stderr, proc.stderr


def test_the_cache_is_bounded_and_drops_the_least_recently_used():
    from rtq.buffercache import BufferCache, Slot

    cache = BufferCache(3 * MiB)
    for name in "abc":
        slot = Slot(MiB)
        slot.view()[:] = name.encode() * MiB
        cache.put(name, slot)
    assert cache.get("a") is not None  # now the most recent
    slot = Slot(MiB)
    cache.put("d", slot)
    assert cache.used == 3 * MiB and cache.get("b") is None
    assert bytes(cache.get("a")[:2]) == b"aa" and cache.get("c") is not None
    assert BufferCache(0).fits(1) is False
    # A bytes object is kept as itself, counted alike, and evicted alike.
    data = b"e" * MiB
    assert cache.put_bytes("e", data) is data and cache.used == 3 * MiB and cache.get("d") is None
    assert cache.get("e", as_bytes=True) is data
    copy = cache.get("e")  # asked for as a writable buffer: a copy of its own
    assert type(copy) is bytearray and copy == data
    copy[0] = 0
    assert cache.get("e", as_bytes=True) == data
    assert cache.get("a", as_bytes=True) == b"a" * MiB  # a file entry read into a new bytes object
    cache.clear()
    assert cache.used == 0 and len(cache) == 0


# -- safety ----------------------------------------------------------------------------------
def _tamper(r: redis.Redis) -> None:
    (key, size), *_ = blob_keys(r).items()
    ttl = r.pttl(key)
    r.set(key, os.urandom(size), px=ttl)


def test_under_a_secret_a_planted_buffer_is_refused_before_anything_is_built(r, workers, tmp_path):
    workers.start("dig", task_fn=None, args=("--cache-bytes", "0"), env={"RTQ_SECRET": SECRET})
    marker = tmp_path / "ran"
    data = array(2)
    with executor(r, secret=SECRET) as ex:
        assert ex.submit(len, data).result(timeout=60) == 2 * MiB
        _tamper(r)  # same size, other bytes: what an attacker with write access could plant
        with pytest.raises(SignatureError, match="does not match the digest its signed payload names"):
            ex.submit(_touch_then_len, str(marker), data).result(timeout=60)
        assert not marker.exists(), "the task ran on a planted buffer"
        assert blob_keys(r) == {}, "the planted bytes were kept"
        # The next submit finds the digest gone and sends the bytes again.
        assert ex.submit(len, data).result(timeout=60) == 2 * MiB


def _touch_then_len(path: str, values: Any) -> int:
    os.mkdir(path)
    return len(values)


def test_under_a_secret_the_client_refuses_a_planted_result_buffer(r):
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5, secret=SECRET)
    task = queue.build_task("kept", "nobody", None)
    task.result = numpy.ones(2 * MiB, numpy.uint8)
    queue.set_task(task)
    assert (queue.get_task("kept").result == 1).all()
    _tamper(r)
    with pytest.raises(SignatureError, match="planted or tampered with"):
        queue.get_task("kept")


def test_without_a_secret_a_corrupted_buffer_fails_loudly(r, workers):
    workers.start("dig", task_fn=None, args=("--cache-bytes", "0"))
    data = array(2)
    with executor(r) as ex:
        assert ex.submit(len, data).result(timeout=60) == 2 * MiB
        _tamper(r)
        with pytest.raises(SerializationError, match="corrupted in Redis"):
            ex.submit(len, data).result(timeout=60)
        assert ex.submit(len, data).result(timeout=60) == 2 * MiB  # sent again, and served


def test_a_buffer_gone_between_the_question_and_the_store_is_sent_again(r, workers, monkeypatch):
    workers.start("dig", task_fn=None, args=("--cache-bytes", "0"))
    data = array(4)
    with executor(r) as ex:
        assert ex.submit(len, data).result(timeout=60) == 4 * MiB
        blobs = ex.queue.store.blobs
        asked = blobs.held

        def held_then_gone(refs: Any, keep: int) -> set[str]:
            found = asked(refs, keep)
            r.delete(*blob_keys(r))  # it expires right after Redis said it holds it
            return found

        monkeypatch.setattr(blobs, "held", held_then_gone)
        before = sent_to_redis(r)
        assert ex.submit(len, data).result(timeout=60) == 4 * MiB
        assert sent_to_redis(r) - before > 4 * MiB, "the vanished buffer was not sent again"
    assert sum(blob_keys(r).values()) == 4 * MiB


def test_a_buffer_that_expired_is_missing_loudly_and_the_next_send_stores_it_again(r, workers):
    workers.start("dig", task_fn=None, args=("--cache-bytes", "0"))
    data = array(2)
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5)
    task = queue.build_task("stale", "dig", Call(len, (data,)))
    queue.set_task(task)  # stored, not queued
    for key in blob_keys(r):
        r.pexpire(key, 1)
    wait_for(lambda: not blob_keys(r), 10, "the buffer to expire")
    r.rpush(KEYS.queue("dig"), "stale")
    wait_for(lambda: r.hget(KEYS.task("stale"), "state") == b"failed", 30, "the task to fail")
    _, error = queue.store.outcome("stale")
    assert isinstance(error, SerializationError) and "no longer in Redis (expired or evicted)" in str(error), error
    with rtq.Executor(queue, "dig") as ex:
        assert ex.submit(len, data).result(timeout=60) == 2 * MiB


# -- accounting ------------------------------------------------------------------------------
def test_stored_buffers_expire_and_each_use_keeps_them_longer(r, workers):
    workers.start("dig", task_fn=None)
    data = array(2)
    with executor(r) as ex:
        ex.submit(len, data).result(timeout=60)
        ((key, _),) = blob_keys(r).items()
        ttl = r.pttl(key) / 1000
        # As long as its record can be read (deadline, then 300 s for the outcome, 60 s slack).
        assert 0 < ttl <= 60 + 300 + 60 + 1, ttl
        r.pexpire(key, 5000)
        ex.submit(len, data).result(timeout=60)
        assert r.pttl(key) / 1000 > 300, "using the buffer again did not keep it longer"
    r.pexpire(key, 1)
    wait_for(lambda: not blob_keys(r), 10, "the buffer to expire")


def test_max_payload_counts_what_is_sent(r, workers):
    workers.start("dig", task_fn=None)
    data = array(8)
    small = RedisTaskQueue(r, "test", timeout=60, interval=0.5, max_payload=4 * MiB)
    with rtq.Executor(small, "dig") as ex, pytest.raises(SerializationError, match="payload limit"):
        ex.submit(len, data)
    assert blob_keys(r) == {}
    with executor(r) as ex:
        assert ex.submit(len, data).result(timeout=60) == 8 * MiB
    with rtq.Executor(small, "dig") as ex:  # Redis holds it now: only its digest is sent
        assert ex.submit(len, data).result(timeout=60) == 8 * MiB


def test_rtq_status_shows_what_the_namespace_holds_by_digest(r, workers):
    workers.start("dig", task_fn=None)
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5)
    with rtq.Executor(queue, "dig") as ex:
        ex.submit(len, array(3)).result(timeout=60)
        ex.submit(len, array(2, seed=5)).result(timeout=60)
    status = gather_status(queue)
    assert status["digests"] == {"buffers": 2, "keys": 2, "bytes": 5 * MiB}
    assert re.search(r"buffers by digest: 2 \(5\.0 MiB in 2 keys\)", format_status(status)), format_status(status)


def test_small_buffers_still_travel_with_their_payload(r, workers):
    workers.start("dig", task_fn=None)
    with executor(r) as ex:
        assert ex.submit(operator.length_hint, numpy.zeros(1000)).result(timeout=60) == 1000
    assert blob_keys(r) == {}


def test_buffers_over_a_frame_are_stored_in_parts(r, workers, monkeypatch):
    import rtq.backend.blobs as blobs_module
    import rtq.backend.encoded as encoded_module

    # Parts of 1 MiB, as a buffer over 64 MiB has: five keys for a 4.5 MiB array.
    monkeypatch.setattr(blobs_module, "CHUNK", MiB)
    monkeypatch.setattr(encoded_module, "CHUNK", MiB)
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5)
    task = queue.build_task("parts", "nobody", None)
    task.result = numpy.concatenate([array(4), array(1)[: MiB // 2]])
    queue.set_task(task)
    assert sorted(blob_keys(r).values()) == [MiB // 2, MiB, MiB, MiB, MiB]
    assert (queue.get_task("parts").result == task.result).all()


# -- fuzz: whatever is planted, a signed reader never unpickles it ----------------------------
_recording = threading.local()
_found: list[tuple[str, str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class" and getattr(_recording, "on", False):
        _found.append((str(args[0]), str(args[1])))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records inside the reads below


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(["buffer", "envelope", "truncate", "swap"]),
    at=st.integers(0, 2 * MiB - 1),
    byte=st.integers(1, 255),
)
def test_fuzz_a_planted_buffer_or_digest_is_never_unpickled_under_a_secret(redis_url, where, at, byte):
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    queue = RedisTaskQueue(r, "test", timeout=60, interval=0.5, secret=SECRET)
    task = queue.build_task("fuzz", "nobody", None)
    task.result = {"a": numpy.zeros(MiB, numpy.uint8), "b": numpy.ones(MiB + 7, numpy.uint8)}
    queue.set_task(task)
    blobs = sorted(blob_keys(r))
    if where == "buffer":  # one byte of one buffer changed
        key = blobs[at % 2]
        r.setrange(key, at % r.strlen(key), bytes([r.getrange(key, 0, -1)[at % r.strlen(key)] ^ byte]))
    elif where == "envelope":  # one byte of the signed envelope (its digest list among them)
        first = bytearray(r.hget(KEYS.task("fuzz"), "result"))
        first[at % len(first)] ^= byte
        r.hset(KEYS.task("fuzz"), "result", bytes(first))
    elif where == "truncate":
        r.set(blobs[at % 2], r.getrange(blobs[at % 2], 0, at % MiB))
    else:  # each buffer's bytes planted under the other's digest
        a, b = (r.get(k) for k in blobs)
        r.set(blobs[0], b)
        r.set(blobs[1], a)
    _found.clear()
    _recording.on = True
    try:
        with pytest.raises((SignatureError, SerializationError)):
            queue.get_task("fuzz")
    finally:
        _recording.on = False
    assert _found == [], "unpickling began on a planted payload"
    r.close()


def test_a_client_that_decodes_responses_stores_and_reads_buffers_by_digest(redis_url, r):
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = RedisTaskQueue(decoding, "test", timeout=60, interval=0.5)
    data = array(2)
    for task_id in ("d1", "d2"):
        task = queue.build_task(task_id, "nobody", None)
        task.result = data
        queue.set_task(task)
    assert list(blob_keys(r).values()) == [2 * MiB]  # one copy for both
    assert all((queue.get_task(t).result == data).all() for t in ("d1", "d2"))
    assert gather_status(queue)["digests"] == {"buffers": 1, "keys": 1, "bytes": 2 * MiB}
    decoding.close()
