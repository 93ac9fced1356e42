"""``%%rtq --session`` and ``%rtq session | pull | push``, in a real IPython kernel (nbclient).

One kernel serves the module; each test starts its own worker subprocess on queue ``cells``
(``--sessions 2``) and connects the kernel to it. The test's ``r`` fixture empties the database
first, so each test opens its sessions anew (names are per kernel: the kernel forgets a session
whose worker is gone only when told to, so each test closes what it opened).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conftest import Workers, wait_for
from test_magic import Kernel, _client, _kernel_env, errors, result, streams, traceback_text, usage_error

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    client = _client()
    with client.setup_kernel(env=_kernel_env()):
        k = Kernel(client)
        cell = k.run("%load_ext rtq")
        assert not cell.outputs, cell.outputs
        yield k


@pytest.fixture
def cells(kernel: Kernel, workers: Workers, redis_url: str) -> Iterator[Kernel]:
    """The kernel, connected, with a worker serving queue ``cells`` that holds 2 sessions."""
    _worker["proc"] = workers.start("cells", task_fn=None, prefix="rtq", args=("--sessions", "2", "--lease", "2"))
    kernel.connect(redis_url)
    yield kernel
    kernel.run("get_ipython().magics_manager.registry['RtqMagics'].session.sessions.close_all('the test ended')")


_worker: dict[str, subprocess.Popen[str]] = {}


def _sent(r: redis.Redis) -> int:
    """Bytes Redis has read from all its clients so far."""
    return int(r.info("stats")["total_net_input_bytes"])


def test_a_big_value_stays_in_the_session_and_the_next_cell_ships_little(cells: Kernel, r: redis.Redis) -> None:
    cell = cells.run("%%rtq cells --session s\nbig = bytearray(200_000_000)\nfirst = id(big)")
    assert not errors(cell), traceback_text(cell)
    assert cells.value("'big' in dir(), 'first' in dir()") == "(False, False)"  # nothing came back
    before = _sent(r)
    cell = cells.run("%%rtq cells --session s --pull same\nsame = id(big) == first\nlen(big)")
    sent = _sent(r) - before
    assert not errors(cell), traceback_text(cell)
    assert result(cell)["text/plain"] == "200000000"
    assert cells.value("same") == "True"  # the very object the first cell made
    assert sent < 1_000_000, sent  # the cell, not the 200 MB
    assert cells.value("'big' in dir()") == "False"


def test_reads_the_session_lacks_are_shipped_and_what_it_holds_wins(cells: Kernel) -> None:
    cells.run("a = 5")
    cell = cells.run("%%rtq cells --session s\nb = a * 2\nprint('hello from', 'the session')\nb")
    assert not errors(cell), traceback_text(cell)
    assert result(cell)["text/plain"] == "10"
    assert streams(cell, "stdout") == "hello from the session\n"
    cells.run("a = 100")
    assert cells.value("%%rtq cells --session s\na") == "5"  # the session holds a: its own wins
    cells.run("%rtq push s a")
    assert cells.value("%%rtq cells --session s\na + b") == "110"
    # A cell's exception shows its own line; the session lives on.
    cell = cells.run("%%rtq cells --session s\nc = 1\nb / 0")
    assert errors(cell)[0].ename == "ZeroDivisionError" and "----> 3 b / 0" in traceback_text(cell)
    assert cells.value("%%rtq cells --session s\nc, b") == "(1, 10)"


def test_session_listing_and_pull(cells: Kernel) -> None:
    cell = cells.run("%%rtq cells --session s\nimport os\npid = os.getpid()\nblob = bytes(3_000_000)\nx = [1, 2]")
    assert not errors(cell), traceback_text(cell)
    listing = streams(cells.run("%rtq session"))
    assert "session 's' (queue 'cells'): worker " in listing and "age " in listing and "idle " in listing, listing
    assert "blob  bytes  2.9 MiB" in listing and "pid " in listing and "x " in listing, listing
    status = streams(cells.run("%rtq status"))
    assert "sessions and actors (1):\n  cell 's'  worker " in status, status
    assert "blob (bytes, 2.9 MiB)" in status and "idle " in status, status
    cell = cells.run("%rtq pull s pid x")
    assert not errors(cell), cell.outputs
    assert cells.value("pid == os.getpid() if (os := __import__('os')) else 0") == "False"
    assert cells.value("x") == "[1, 2]"
    message = usage_error(cells.run("%rtq pull s nosuch"))
    assert "holds no 'nosuch'" in message and "blob" in message and "pid" in message, message
    cell = cells.run("%%rtq cells --session s --pull nothere\ny = 1")
    assert "holds no 'nothere'" in streams(cell, "stderr") and "y" in streams(cell, "stderr")


def test_stopping_a_cell_keeps_the_namespace(cells: Kernel, tmp_path: Path) -> None:
    started = tmp_path / "started"
    cells.run(f"%%rtq cells --session s\nkept = 'still here'\nmarker = {str(started)!r}")
    cell = cells.run(
        "%%rtq cells --session s --no-wait -o job\nimport time\nopen(marker, 'w').close()\n"
        "while True:\n    time.sleep(0.01)"
    )
    assert not errors(cell), traceback_text(cell)
    wait_for(started.exists, 30, "the cell to start")
    cells.run("job.stop()")
    cell = cells.run("%rtq wait job")
    assert errors(cell) and errors(cell)[0].ename == "TaskCancelled", cell.outputs
    assert cells.value("%%rtq cells --session s\nkept") == "'still here'"


def test_bad_input(cells: Kernel) -> None:
    assert "session name must not be empty" in usage_error(cells.run('%%rtq cells --session ""\n1'))
    assert "must not contain the key separator" in usage_error(cells.run("%%rtq cells --session a|b\n1"))
    assert "no session 'nosuch'" in usage_error(cells.run("%rtq session close nosuch"))
    assert "no session 'nosuch'" in usage_error(cells.run("%rtq pull nosuch a"))
    assert not errors(cells.run("%%rtq cells --session s1\n1"))
    assert "not defined in the notebook: undefined_name" in usage_error(cells.run("%rtq push s1 undefined_name"))
    assert not errors(cells.run("%%rtq cells --session s2\n1"))
    message = usage_error(cells.run("%%rtq cells --session s3\n1"))  # the worker holds 2
    assert "--session s3" in message and "--sessions limit" in message and "(2/2)" in message, message


def test_a_killed_worker_makes_the_next_cell_raise_session_lost(cells: Kernel, r: redis.Redis) -> None:
    cells.run("%%rtq cells --session s\nv = 1")
    os.kill(_worker["proc"].pid, signal.SIGKILL)
    wait_for(lambda: not r.keys("rtq|task-queue|worker:*"), 10, "the worker's lease to end")
    cell = cells.run("%%rtq cells --session s\nv")
    (err,) = errors(cell)
    assert err.ename == "SessionLost" and "died" in err.evalue, err
    assert "%rtq session close s" in traceback_text(cell)
    assert "LOST" in streams(cells.run("%rtq session"))


def test_kernel_shutdown_closes_its_sessions(workers: Workers, redis_url: str, r: redis.Redis) -> None:
    workers.start("cells", task_fn=None, prefix="rtq")
    client = _client()
    with client.setup_kernel(env=_kernel_env(RTQ_NB_TEST=uuid.uuid4().hex)):
        k = Kernel(client)
        k.run("%load_ext rtq")
        k.connect(redis_url)
        assert not errors(k.run("%%rtq cells --session held\nw = 1"))
        (record,) = r.keys("rtq|task-queue|session:*")
        assert r.hget(record, "state") == b"open"
    wait_for(lambda: r.hget(record, "state") == b"closed", 30, "the kernel's session to close")
    assert b"kernel shut down" in r.hget(record, "reason")


def test_a_big_notebook_array_read_by_session_cells_travels_once_by_digest(cells: Kernel, r: redis.Redis) -> None:
    cell = cells.run("import numpy as np\narr = np.arange(8 * 2**20, dtype=np.int64)  # 64 MiB")
    assert not errors(cell), traceback_text(cell)
    before = _sent(r)
    cell = cells.run("%%rtq cells --session s\nfirst = int(arr[-1])\nint(arr.sum() % 1000)")
    assert not errors(cell), traceback_text(cell)
    assert result(cell)["text/plain"] == str(sum(range(8 * 2**20)) % 1000)
    assert _sent(r) - before >= 64 * 2**20  # the array went once...
    stored = [k for k in r.scan_iter(match="rtq|task-queue|blob:*", count=1000)]
    assert sum(r.strlen(k) for k in stored) >= 64 * 2**20, stored  # ...stored under its digest
    # Another session reading the same array: only its digest travels; the cell sees the array.
    before = _sent(r)
    cell = cells.run("%%rtq cells --session t\nint(arr[-1]) + len(arr)")
    assert not errors(cell), traceback_text(cell)
    assert result(cell)["text/plain"] == str(8 * 2**20 - 1 + 8 * 2**20)
    assert _sent(r) - before < 2**20, "the array was shipped again instead of by its digest"
    cells.run("%rtq session close s\n%rtq session close t")
