"""Bad arguments get a clear error at the call, naming the argument and what is allowed.

Not a traceback from inside redis-py, not a hang, not silence: each case below was one of those.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Any

import pytest
import redis

import rtq
from conftest import wait_for
from rtq import RedisTaskQueue, TaskExecutePolicy
from rtq.errors import ConfigurationError, TaskTimeout
from taskfns import echo_task

HEAD = "test|task-queue|"

BAD_TIMEOUTS = [
    pytest.param(math.nan, ValueError, "finite number of seconds above zero", id="nan"),
    pytest.param(math.inf, ValueError, "finite number of seconds above zero", id="inf"),
    pytest.param(0, ValueError, "above zero, not 0", id="zero"),
    pytest.param(-1.5, ValueError, "above zero, not -1.5", id="negative"),
    pytest.param("30", TypeError, "number of seconds, not str '30'", id="str"),
    pytest.param(True, TypeError, "number of seconds, not bool", id="bool"),
]


def make_queue(r: redis.Redis, **kwargs: Any) -> RedisTaskQueue:
    return RedisTaskQueue(r, "test", **{"timeout": 30, "interval": 0.5, "task_fn": echo_task, **kwargs})


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "error", "message"), BAD_TIMEOUTS)
def test_a_bad_queue_timeout_is_refused(r, bad, error, message):
    with pytest.raises(error, match=f"^timeout must be a .*{message}"):
        RedisTaskQueue(r, "test", timeout=bad)
    with pytest.raises(error, match=f"^interval must be a .*{message}"):
        RedisTaskQueue(r, "test", interval=bad)


@pytest.mark.parametrize("policy", list(TaskExecutePolicy))
@pytest.mark.parametrize(("bad", "error", "message"), BAD_TIMEOUTS)
def test_a_bad_query_timeout_is_refused_before_anything_is_stored(r, bad, error, message, policy):
    q = make_queue(r)
    started = time.monotonic()
    with pytest.raises(error, match=f"^timeout must be a .*{message}"):
        q.query("t1", "q", {"action": "echo", "value": 1}, timeout=bad, policy=policy)
    assert time.monotonic() - started < 5  # at the call: no wait for a deadline
    assert r.keys(f"{HEAD}*") == []


@pytest.mark.parametrize(("bad", "error", "message"), BAD_TIMEOUTS)
def test_a_bad_executor_timeout_is_refused(r, bad, error, message):
    with pytest.raises(error, match=f"^timeout must be a .*{message}"):
        rtq.Executor(make_queue(r), "q", timeout=bad)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        pytest.param(math.nan, ValueError, r"None \(no limit\) or a finite number of seconds, not nan", id="nan"),
        pytest.param(math.inf, ValueError, r"None \(no limit\) or a finite number of seconds, not inf", id="inf"),
        pytest.param("5", TypeError, r"None \(no limit\) or a number of seconds, not str '5'", id="str"),
    ],
)
def test_a_bad_wait_on_a_future_is_refused(r, bad, error, message):
    fut = rtq.Executor(make_queue(r), "nobody", check_versions=False).submit(abs, -1)  # nobody serves it: pending
    with pytest.raises(error, match=f"^timeout must be {message}"):
        fut.result(bad)
    with pytest.raises(error, match=f"^timeout must be {message}"):
        fut.exception(bad)
    # The concurrent.futures contract stands: zero or less means "do not wait".
    for now in (0, -1):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            fut.result(now)
        assert time.monotonic() - started < 5
    assert fut.cancel()


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "   ", " , ", b"", [], ["", " "]], ids=repr)
def test_an_empty_secret_is_refused_not_taken_for_unsigned(r, redis_url, secret):
    with pytest.raises(ConfigurationError, match=r"^secret is empty .*or None for unsigned payloads"):
        RedisTaskQueue(r, "test", secret=secret)
    with pytest.raises(ConfigurationError, match=r"^secret is empty"):
        rtq.connect(redis_url, secret=secret)


def test_a_secret_of_the_wrong_type_is_refused_without_echoing_it(r):
    with pytest.raises(TypeError, match=r"^secret must be a str, bytes or a list of them .*not int$"):
        RedisTaskQueue(r, "test", secret=123456)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [" ", "\t", " , "], ids=repr)
def test_a_blank_rtq_secret_is_refused(r, monkeypatch, value):
    monkeypatch.setenv("RTQ_SECRET", value)
    with pytest.raises(ConfigurationError, match=r"^RTQ_SECRET holds no secret .*or unset it for unsigned payloads"):
        RedisTaskQueue(r, "test")


def test_an_empty_rtq_secret_means_unset(r, monkeypatch):
    monkeypatch.setenv("RTQ_SECRET", "")  # what `RTQ_SECRET= cmd` and many service managers write for "none"
    assert not RedisTaskQueue(r, "test").signed


# -- things that are not what they should be --------------------------------------------------


@pytest.mark.parametrize("fn", [5, "abs", None, [print]], ids=repr)
def test_submitting_something_that_cannot_be_called_is_refused_at_submit(r, fn):
    ex = rtq.Executor(make_queue(r), "q", check_versions=False)
    with pytest.raises(TypeError, match=r"^submit\(\)'s fn must be callable .*, not "):
        ex.submit(fn)
    with pytest.raises(TypeError, match=r"^map\(\)'s fn must be callable"):
        ex.map(fn, [1])
    assert r.keys(f"{HEAD}*") == []  # nothing was stored for a worker to fail on


def test_a_task_fn_that_cannot_be_called_is_refused(r):
    with pytest.raises(TypeError, match=r"^task_fn must be callable .*not str 'mymodule:run'"):
        RedisTaskQueue(r, "test", task_fn="mymodule:run")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "client",
    ["redis://user:hunter2@example.com:6379/0", None, 6379, redis.asyncio.Redis()],
    ids=["url", "none", "port", "asyncio"],
)
def test_a_redis_argument_that_is_not_a_client_is_refused(client):
    with pytest.raises(TypeError, match=r"^redis must be a redis-py client such as redis.Redis.from_url") as err:
        RedisTaskQueue(client, "test")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("policy", [1, "Remote", None], ids=repr)
def test_a_policy_that_is_not_a_policy_is_refused(r, policy):
    with pytest.raises(TypeError, match=r"^policy must be a TaskExecutePolicy \(Local, Remote, LocalFirst"):
        make_queue(r).query("p1", "q", None, policy=policy)
    assert r.keys(f"{HEAD}*") == []


# -- connect() --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "   "], ids=repr)
def test_connect_to_an_empty_url_is_refused_not_the_embedded_server(url, monkeypatch):
    monkeypatch.setenv("RTQ_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: the error comes first
    from rtq import server

    before = server._default
    with pytest.raises(ConfigurationError, match=r"^url is empty: pass a Redis URL such as redis://HOST:6379/0"):
        rtq.connect(url)
    assert server._default is before  # no embedded server was started for it


@pytest.mark.parametrize("url", [123, b"redis://localhost"], ids=repr)
def test_connect_to_a_url_that_is_not_a_string_is_refused(url):
    with pytest.raises(TypeError, match=r"^url must be a Redis URL string"):
        rtq.connect(url)


def test_connect_with_an_unknown_option_names_it(redis_url):
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) 'socket_timout'.*suffix, task_fn, timeout"):
        rtq.connect(redis_url, socket_timout=5)
    q = rtq.connect(redis_url, prefix="test", socket_timeout=5, max_connections=50, timeout=30)  # real ones pass
    assert q.redis.connection_pool.max_connections == 50


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_connect_to_the_unspecified_address_says_it_is_no_place_to_connect_to(host):
    with pytest.raises(ConfigurationError, match=r"names no place to connect to: .* means 'every address"):
        rtq.connect(f"redis://{host}:6379/0")


# -- key names -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["team*", "a?b", "x[1]", "back\\slash"])
def test_a_prefix_holding_a_key_pattern_is_refused(r, prefix):
    with pytest.raises(
        ConfigurationError, match=f"^prefix {re.escape(repr(prefix))} must not contain .*as a key pattern"
    ):
        RedisTaskQueue(r, prefix)
    with pytest.raises(ConfigurationError, match=r"^suffix .* must not contain"):
        RedisTaskQueue(r, "test", suffix=prefix)


def test_a_hash_tag_prefix_is_fine(r):
    assert RedisTaskQueue(r, "{team}").keys.queue("q") == "{team}|task-queue|task-queue|q"


# -- listen() ---------------------------------------------------------------------------------


def test_listen_with_one_name_as_a_string_serves_that_queue_not_its_letters(r):
    q = make_queue(r)
    event = threading.Event()
    thread = threading.Thread(target=q.listen, args=("gpu", 2, event), daemon=True)
    thread.start()
    try:
        wait_for(lambda: q.is_listened("gpu"), 30, "the listener to mark gpu")
        assert not any(q.is_listened(letter) for letter in "gpu")
        assert make_queue(r).query("l1", "gpu", {"action": "echo", "value": 7}, policy=TaskExecutePolicy.Remote) == 7
    finally:
        event.set()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (b"gpu", TypeError, r"^names must be a list of queue names \(or one name as a str\), not bytes"),
        (5, TypeError, "^names must be a list of queue names"),
        ([], ValueError, "at least one queue name"),
        (["gpu", ""], ValueError, "queue name must not be empty"),
    ],
    ids=repr,
)
def test_listen_with_names_that_are_not_names_is_refused(r, names, error, message):
    with pytest.raises(error, match=message):
        make_queue(r).listen(names)
    assert r.keys(f"{HEAD}task-listen|*") == []


@pytest.mark.parametrize(("workers", "error"), [(0, ValueError), (-2, ValueError), ("4", TypeError)], ids=repr)
def test_listen_with_a_bad_number_of_workers_is_refused(r, workers, error):
    with pytest.raises(error, match=r"^workers must be "):
        make_queue(r).listen(["q"], workers)


# -- a future past its deadline reads like the wait path ----------------------------------------


def test_a_future_past_its_deadline_says_it_ran_past_its_timeout(r, workers):
    workers.start("slow", task_fn=None, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    ex = rtq.Executor(make_queue(r), "slow", timeout=1)
    fut = ex.submit(time.sleep, 60)
    with pytest.raises(TaskTimeout, match=f"^task {fut.task_id} in slow ran past its 1 s timeout$"):
        fut.result(60)


def test_a_timeout_the_worker_stored_is_read_in_the_words_of_the_callers_timeout(r, workers):
    """At its deadline a task's own update() raises TaskTimeout on the worker, which may store it
    a moment before the caller's deadline check gets there (about one time in eight when nothing
    else runs; always, when the worker's clock is a little ahead). The caller then reads the same
    words as when its own check comes first. Here the task stores its TaskTimeout just before the
    deadline, and the caller's collector is held back until the deadline has passed."""

    def stops_itself() -> None:
        task = rtq.current_task()
        while time.time() < task.expiry - 0.3:
            time.sleep(0.005)
        raise TaskTimeout(f"Task {task.id} in {task.name} has expired")

    workers.start("late", task_fn=None, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    q = make_queue(r)
    ex = rtq.Executor(q, "late", timeout=2)
    collector = q.collector
    with collector._leader:  # the collector cannot read the inbox meanwhile
        fut = ex.submit(stops_itself)
        wait_for(lambda: r.llen(collector.inbox) == 1, 30, "the worker to store the task's TaskTimeout")
        wait_for(lambda: time.time() > fut.expiry, 30, "the deadline to pass")
        collector._last_check = time.monotonic()  # its next round reads the inbox, not the deadlines
    with pytest.raises(TaskTimeout, match=f"^task {fut.task_id} in late ran past its 2 s timeout$") as err:
        fut.result(60)
    assert "has expired" in str(err.value.__cause__)  # the worker's own words stay attached
