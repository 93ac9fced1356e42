"""A password in a Redis URL never shows: not in an exception, a CLI message, a log line or a repr.

Users paste URLs like ``redis://:PASSWORD@host:6379/0`` into notebooks and command lines; when
something about one is wrong, the message must still name the URL, with ``***`` for the secret.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

import rtq
from conftest import ROOT, TESTS
from rtq.connection import redact_url
from rtq.errors import ConfigurationError, RtqConnectionError, RtqError

SECRET = "hunter2"
CLI_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET")},
    "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]),
}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://alice:hunter2@host:6379/0", "redis://alice:***@host:6379/0"),
        ("redis://:hun@ter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://alice:hun:ter2@host:6379/0", "redis://alice:***@host:6379/0"),
        ("redis://:hun%40ter%3A2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://:hun/ter2@host:6379/0", "redis://:***@host:6379/0"),  # an unescaped "/" ...
        ("redis://:hun#ter2@host:6379/0", "redis://:***@host:6379/0"),  # ... "#" ...
        ("redis://:hun?ter2@host:6379/0", "redis://:***@host:6379/0"),  # ... or "?" in it
        ("redis://host:6379/0?password=hunter2&db=1", "redis://host:6379/0?password=***&db=1"),
        (
            "rediss://host:6380/0?ssl_ca_certs=ca.pem&ssl_password=hunter2",
            "rediss://host:6380/0?ssl_ca_certs=ca.pem&ssl_password=***",
        ),
        ("unix://:hunter2@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=***"),
        ("redis+sentinel://:hunter2@h1:26379,h2:26379/mymaster", "redis+sentinel://:***@h1:26379,h2:26379/mymaster"),
        ("redis://:hunter2@[::1/0", "redis://:***@[::1/0"),  # not even a valid URL
        ("redis://alice@host:6379/0", "redis://alice@host:6379/0"),  # a user name alone is no secret
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_url_hides_every_spelling_of_a_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


BAD_URLS = [
    # (URL, what is wrong with it, the URL as the message must show it)
    ("redis://:hunter2@127.0.0.1:1/0?socket_timeout=abc", "socket_timeout", "redis://:***@127.0.0.1:1/0"),
    ("redis://alice:hun@ter2@127.0.0.1:abc/0", "Port", "redis://alice:***@127.0.0.1:abc/0"),
    ("redis://127.0.0.1:1/0?password=hunter2&socket_timeout=abc", "socket_timeout", "?password=***&"),
    # An unescaped "/" cuts the password in two, and the parser's error quotes the first part.
    (
        "redis://:hun/ter2@127.0.0.1:1/0",
        "Port could not be cast to integer value as '***'",
        "redis://:***@127.0.0.1:1/0",
    ),
]


@pytest.mark.parametrize(("url", "problem", "shown"), BAD_URLS)
def test_a_malformed_url_is_named_without_its_password(url: str, problem: str, shown: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        rtq.connect(url)
    message = str(info.value)
    assert problem in message and shown in message, message
    assert "hun" not in message and "ter2" not in message


def test_an_unreachable_url_is_named_without_its_password() -> None:
    for url, shown in [
        ("redis://:hunter2@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        ("redis://127.0.0.1:1/0?password=hunter2", "redis://127.0.0.1:1/0?password=***"),
    ]:
        with pytest.raises(RtqConnectionError) as info:
            rtq.connect(url, socket_connect_timeout=5)
        assert shown in str(info.value) and SECRET not in str(info.value), str(info.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["worker", "gpu"], ["status"]])
def test_the_cli_names_a_bad_url_without_its_password(command: list[str]) -> None:
    for url, _, shown in BAD_URLS:
        done = subprocess.run(
            [sys.executable, "-m", "rtq", *command, "--url", url],
            env=CLI_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert shown in done.stderr, done.stderr
        assert "hun" not in done.stdout + done.stderr and "ter2" not in done.stdout + done.stderr, done.stderr


@pytest.mark.timeout(120)
def test_a_local_worker_that_cannot_start_shows_its_output_without_the_password(redis_url: str) -> None:
    q = rtq.connect(redis_url, "redact")
    with pytest.raises(RtqError, match="did not start") as info:
        rtq.local_worker(q, "x", url=BAD_URLS[0][0])
    assert BAD_URLS[0][2] in str(info.value) and SECRET not in str(info.value), str(info.value)


@pytest.mark.timeout(120)
def test_reprs_of_what_holds_a_url_show_no_password(redis_url: str, r: redis.Redis) -> None:
    password = r.connection_pool.connection_kwargs.get("password")
    if not password:
        pytest.skip("this server has no password (RTQ_TEST_REDIS_URL without one)")
    q = rtq.connect(redis_url, "redact", timeout=30)
    with rtq.local_worker(q, "redact") as worker, rtq.Executor(q, "redact") as ex:
        fut = ex.submit(lambda: 1)
        assert fut.result(30) == 1
        shown = " ".join(map(repr, (q, ex, fut, worker)))
        assert password not in shown, shown
