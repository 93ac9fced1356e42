"""rtq.backend.wire, the held connections of the hot paths, with and without hiredis.

Every task's trip goes through these channels; hiredis (the ``fast`` extra) packs and parses
in C when installed, rtq's own RESP code does it otherwise. Both must give the same replies:
values, errors in their place (NOSCRIPT typed, also inside EXEC), big values sent uncopied,
and frames read straight into buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from rtq.backend import resp, wire

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["hiredis-resp2", "hiredis-resp3", "python-resp2", "python-resp3"])
def channel(
    request: pytest.FixtureRequest, r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[wire.Channel]:
    parser, protocol = request.param.split("-resp")
    if parser == "hiredis":
        if resp.hiredis is None:
            pytest.skip("hiredis is not installed")
    else:
        monkeypatch.setattr(resp, "hiredis", None)
    client = redis.Redis.from_url(redis_url, protocol=int(protocol))
    ch = wire.Channel(client)
    yield ch
    ch.close()
    client.close()


def test_replies_come_back_in_order_with_errors_in_their_place(channel: wire.Channel) -> None:
    replies = channel.pipeline(
        [
            ("SET", "k", "v"),
            ("GET", "k"),
            ("GET", "missing"),
            ("HSET", "h", "a", 1, "b", 2.5),
            ("HMGET", "h", "a", "b", "c"),
            ("LPUSH", "k", "x"),  # wrong type: an error, and the connection stays usable
            ("EVALSHA", "0" * 40, 0),
            ("INCR", "n"),
        ]
    )
    assert replies[:5] == [b"OK", b"v", None, 2, [b"1", b"2.5", None]]
    assert isinstance(replies[5], redis.ResponseError) and "WRONGTYPE" in str(replies[5])
    assert isinstance(replies[6], redis.exceptions.NoScriptError)
    assert replies[7] == 1
    assert channel.execute("GET", "k") == b"v"


def test_a_noscript_inside_exec_is_typed(channel: wire.Channel) -> None:
    replies = channel.pipeline([("MULTI",), ("EVALSHA", "0" * 40, 0), ("SET", "a", "1"), ("EXEC",)])
    *queued, exec_reply = replies
    assert queued[0] == b"OK"
    if isinstance(exec_reply, Exception):  # servers that refuse the transaction at EXEC (EXECABORT)
        return
    assert isinstance(exec_reply[0], redis.exceptions.NoScriptError)
    assert exec_reply[1] == b"OK"


def test_big_values_travel_whole(channel: wire.Channel) -> None:
    big = bytes(range(256)) * (resp.BIG_ARG // 128)  # two BIG_ARGs: sent uncopied
    view = memoryview(bytearray(big[::-1]))
    assert channel.pipeline([("SET", "big", big), ("SET", "view", view), ("GET", "big"), ("STRLEN", "view")]) == [
        b"OK",
        b"OK",
        big,
        len(big),
    ]
    assert channel.execute("GET", "view") == bytes(view)


def test_frames_are_read_straight_into_their_buffers(channel: wire.Channel) -> None:
    frames = [b"a" * 1000, b"b" * 70_000]
    channel.execute("HSET", "frames", "f0", frames[0], "f1", frames[1], "small", "x")
    targets = [memoryview(bytearray(len(f))) for f in frames]
    assert channel.read_into(("HMGET", "frames", "f0", "f1"), targets)
    assert [bytes(t) for t in targets] == frames
    wrong = [memoryview(bytearray(10)), memoryview(bytearray(len(frames[1])))]
    assert not channel.read_into(("HMGET", "frames", "f0", "f1"), wrong)  # a frame of another size
    assert channel.execute("HGET", "frames", "small") == b"x"  # and the connection is in step
    channel.pipeline([("SET", "k0", frames[0]), ("SET", "k1", frames[1])])
    targets = [memoryview(bytearray(len(f))) for f in frames]
    assert channel.read_into(("MGET", "k0", "k1"), targets)  # frames under keys of their own
    assert [bytes(t) for t in targets] == frames
    assert not channel.read_into(("MGET", "k0", "gone"), targets)  # a missing frame


def test_buffers_are_allocated_only_once_the_lengths_in_redis_are_known(channel: wire.Channel) -> None:
    frames = [b"a" * 1000, b"b" * 70_000]
    channel.pipeline([("SET", "k0", frames[0]), ("SET", "k1", frames[1])])
    measure = [("STRLEN", "k0"), ("STRLEN", "k1")]
    seen: list[Any] = []

    def allocate(lengths: list[Any]) -> list[memoryview]:
        seen.append(lengths)
        return [memoryview(bytearray(n)) for n in lengths]

    assert channel.read_into(("MGET", "k0", "k1"), allocate, measure=measure)
    assert seen == [[1000, 70_000]]

    class Refused(Exception):
        pass

    def refuse(lengths: list[Any]) -> list[memoryview]:
        raise Refused(lengths)

    with pytest.raises(Refused):  # the read's reply is left unread: the connection is dropped
        channel.read_into(("MGET", "k0", "k1"), refuse, measure=measure)
    assert channel.execute("GET", "k0") == frames[0]  # a fresh connection, in step


def test_a_blocking_read_wakes_with_the_reads_behind_it(channel: wire.Channel, r: redis.Redis) -> None:
    r.rpush("done", "id")
    r.hset("task", "state", "done")
    assert channel.pipeline([("BLPOP", "done", 1), ("HGET", "task", "state")]) == [[b"done", b"id"], b"done"]


def test_script_replies_keep_their_shape(channel: wire.Channel) -> None:
    """rtq's scripts answer with nested tables, false and numbers: the claim's reply, say."""
    script = "return {{1, 'tok', false}, {}, redis.call('EXISTS', KEYS[1]) == 1, tonumber(ARGV[1]) * 2}"
    reply = channel.execute("EVAL", script, 1, "nothing", 21)
    assert reply == [[1, b"tok", None], [], None, 42]


def test_a_task_state_travels_as_its_text(channel: wire.Channel) -> None:
    """Every submit and outcome carries a ``TaskState`` (a ``str`` subclass): packed as its text."""
    from rtq.task import TaskState

    assert channel.pipeline([("HSET", "h", "state", TaskState.DONE, "n", 1), ("HMGET", "h", "state", "n")]) == [
        2,
        [b"done", b"1"],
    ]
