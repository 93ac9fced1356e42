"""``rtq worker`` and ``rtq status`` as a supervisor and a user see them: exit codes and one-line errors.

A user mistake gets argparse's usage line and one error, with exit status 2, before anything is
written to Redis; a worker whose listener dies exits non-zero, so ``Restart=on-failure`` restarts it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from conftest import ROOT, TESTS, fake_nvidia_smi
from rtq.connection import is_local_url

ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET")},
    "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]),
}


def rtq_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def assert_usage_error(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("usage:", " "))]
    assert len(errors) == 1 and message in errors[0], done.stderr


# -- every flag checked up front ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--workers", "0"), "argument --workers: must be at least 1, not '0'"),
        (("--workers", "four"), "argument --workers: must be a whole number, not 'four'"),
        (("--timeout", "-1"), "argument --timeout: must be a finite number of seconds above zero, not '-1'"),
        (("--timeout", "nan"), "argument --timeout: must be a finite number of seconds above zero, not 'nan'"),
        (("--interval", "0"), "argument --interval: must be a finite number of seconds above zero, not '0'"),
        (("--lease", "0"), "argument --lease: must be a finite number of seconds above zero, not '0'"),
        (("--grace", "-1"), "argument --grace: must be a finite number of seconds zero or more, not '-1'"),
        (("--max-attempts", "0"), "argument --max-attempts: must be at least 1, not '0'"),
        (("--max-payload", "0"), "argument --max-payload: must be at least 1, not '0'"),
        (("--prefix", "a|b"), "argument --prefix: prefix 'a|b' must not contain the key separator '|'"),
        (("--prefix", "team*"), "argument --prefix: prefix 'team*' must not contain '*'"),
        (("--suffix", ""), "argument --suffix: suffix must not be empty"),
        (("--", "a|b"), "argument NAME: queue name 'a|b' must not contain the key separator '|'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_a_bad_flag_is_refused_before_anything_happens(redis_url, r, args, message):
    done = rtq_cli("worker", *(("q",) if args[0] != "--" else ()), "--url", redis_url, *args)
    assert_usage_error(done, message)
    assert r.dbsize() == 0


@pytest.mark.parametrize("value", [" ", ",", "\t,  "], ids=repr)
def test_a_blank_rtq_secret_is_refused(redis_url, r, value):
    done = rtq_cli("worker", "q", "--url", redis_url, env={"RTQ_SECRET": value})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "rtq worker: RTQ_SECRET holds no secret" in done.stderr
    assert r.dbsize() == 0


def test_rtq_status_refuses_a_prefix_that_is_a_pattern(redis_url):
    assert_usage_error(rtq_cli("status", "--url", redis_url, "--prefix", "*"), "prefix '*' must not contain '*'")


# -- the exit status tells the truth --------------------------------------------------------


@pytest.fixture
def confined_url(r: redis.Redis, redis_url: str) -> Iterator[str]:
    """A user that may reach the server but none of prefix ``test``'s keys (a wrong ACL)."""
    user, password = "rtq-elsewhere", "elsewhere-pw"
    try:
        r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", "~elsewhere|*", "+@all")
    except redis.ResponseError as exc:
        pytest.skip(f"this server does not let the tests create ACL users: {exc}")
    parts = urlsplit(redis_url)
    yield parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()
    r.execute_command("ACL", "DELUSER", user)


def test_a_worker_whose_listener_dies_exits_non_zero(confined_url):
    done = rtq_cli("worker", "q", "--url", confined_url, "--prefix", "test", "--interval", "0.5")
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "rtq worker: stopped serving: NoPermissionError" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- --gpus is checked against the machine's GPUs ---------------------------------------------


def test_gpus_names_a_gpu_this_machine_does_not_have(redis_url, r, tmp_path):
    done = rtq_cli("worker", "q", "--url", redis_url, "--gpus", "7", env=fake_nvidia_smi(tmp_path, 2))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "rtq worker: --gpus 7: this machine has no GPU 7 (it has 2 GPU(s): 0, 1)" in done.stderr
    done = rtq_cli("worker", "q", "--url", redis_url, "--gpus", "GPU-nope", env=fake_nvidia_smi(tmp_path, 2))
    assert done.returncode == 2 and "has no GPU GPU-nope" in done.stderr, done.stderr
    assert r.dbsize() == 0  # no worker process was started


def test_gpus_on_a_machine_whose_gpus_cannot_be_listed_says_so(redis_url, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    done = rtq_cli("worker", "q", "--url", redis_url, "--gpus", "0", env={"PATH": str(empty)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "rtq worker: --gpus 0: cannot list this machine's GPUs to check it (nvidia-smi is not on PATH" in done.stderr


def test_gpus_all_on_a_machine_without_gpus_says_so(redis_url, tmp_path):
    done = rtq_cli("worker", "q", "--url", redis_url, "--gpus", "all", env=fake_nvidia_smi(tmp_path, 0))
    assert done.returncode == 2 and "--gpus all: this machine has no GPU" in done.stderr, done.stderr


# -- rtq status shows what a record has -------------------------------------------------------


def test_rtq_status_shows_workers_whose_records_lack_fields(redis_url, r):
    far = time.time() + 600
    records = {
        "old-version": {"host": "gpu-box"},  # another rtq's record: none of the fields this one writes
        "odd-types": {"queues": "gpu", "started": "yesterday", "workers": 2},
        "not-json": "this is not JSON",
        "a-list": [1, 2],
    }
    for worker_id, record in records.items():
        r.zadd("test|task-queue|workers", {worker_id: far})
        r.set(f"test|task-queue|worker:{worker_id}", record if isinstance(record, str) else json.dumps(record))
    r.rpush("test|task-queue|task-running|old-version", "t1")
    r.hset("test|task-queue|task-result:t1", mapping={"name": "gpu", "progress": "garbage"})
    done = rtq_cli("status", "--url", redis_url, "--prefix", "test")
    assert done.returncode == 0, done.stderr
    assert "workers (4):" in done.stdout
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ") and ":" not in line}
    assert "running=1" in lines["old-version"]
    assert "slots=2" in lines["odd-types"] and "queues=" not in lines["odd-types"]
    assert "not one this rtq can read" in lines["not-json"] and "not one this rtq can read" in lines["a-list"]
    # The running task with what its garbled record still says: its queue, no progress, its worker.
    assert "t1  on gpu  no progress reported  running ?  worker old-version" in done.stdout


# -- what is this machine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        (socket.gethostname(), True),
        (socket.gethostname().upper(), True),
        ("127.1", True),
        ("0x7f.0.0.1", True),
        ("[::ffff:127.0.0.1]", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("192.0.2.7", False),
        ("127.evil.example.com", False),
        (f"{socket.gethostname()}.example.com", False),
    ],
)
def test_what_counts_as_this_machine(host, local):
    assert is_local_url(f"redis://{host}:6379/0") is local


def test_a_worker_on_127_1_serves_without_a_secret(redis_url, workers):
    parts = urlsplit(redis_url)
    if parts.hostname != "127.0.0.1":
        pytest.skip("needs the suite's own server, on 127.0.0.1")
    url = parts._replace(netloc=parts.netloc.replace("127.0.0.1:", "127.1:")).geturl()
    workers.url = url
    workers.start("q", env={"RTQ_SECRET": ""})  # not refused as "not on this machine"


def test_a_worker_pointed_at_0_0_0_0_is_told_that_is_no_address(redis_url):
    port = urlsplit(redis_url).port
    done = rtq_cli("worker", "q", "--url", f"redis://0.0.0.0:{port}/0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "names no place to connect to: 0.0.0.0 means 'every address of this machine'" in done.stderr
