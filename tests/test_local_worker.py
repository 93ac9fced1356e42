"""``rtq.local_worker``: the worker a notebook starts on its own machine when none serves its queue."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import nbformat
import pytest
import redis
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

import rtq
from conftest import wait_for
from nbrun import processes_with_env
from rtq.errors import ConfigurationError, RtqError
from rtq.local import url_of

pytestmark = pytest.mark.timeout(90)


def _whoami() -> int:
    return os.getpid()


def test_serves_its_queues_in_another_process_and_stops(r: redis.Redis, redis_url: str) -> None:
    q = rtq.connect(redis_url, "lw", timeout=30)
    with rtq.local_worker(q, "lw-a", "lw-b", workers=2) as worker:
        assert worker.running and worker.names == ("lw-a", "lw-b")
        assert q.is_listened("lw-a") and q.is_listened("lw-b")
        for name in ("lw-a", "lw-b"):
            with rtq.Executor(q, name) as ex:
                assert ex.submit(_whoami).result(30) == worker.pid
        assert f"pid {worker.pid}" in repr(worker) and "running" in repr(worker)
    assert not worker.running and worker.process.returncode == 0, worker.log()
    # It retired its heartbeat record on the way out.
    assert r.zcard("lw|task-queue|workers") == 0


def test_the_queues_secret_goes_to_the_worker(r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTQ_SECRET", raising=False)
    q = rtq.connect(redis_url, "lws", secret="s3cret,old", timeout=30)
    with rtq.local_worker(q, "signed") as worker, rtq.Executor(q, "signed") as ex:
        # A worker without the secret would refuse the signed task, or send back an unsigned
        # result that this client refuses: a round trip proves it has it.
        assert ex.submit(lambda: "signed both ways").result(30) == "signed both ways"
    assert worker.process.returncode == 0


def test_a_worker_that_cannot_start_raises_with_its_output(redis_url: str) -> None:
    q = rtq.connect(redis_url, "lwf")
    with pytest.raises(RtqError, match=r"did not start:[\s\S]*cannot reach Redis"):
        rtq.local_worker(q, "x", url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="separator"):
        rtq.local_worker(q, "a|b")
    with pytest.raises(ConfigurationError, match="workers must be at least 1"):
        rtq.local_worker(q, "x", workers=0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6390/0",
        "redis://:p%40ss@127.0.0.1:6390/2",
        "redis://alice:secret@localhost:6390/1",
        "rediss://10.0.0.5:6380/0",
        "unix:///tmp/redis.sock?db=3",
    ],
)
def test_url_of_rebuilds_the_clients_url(url: str) -> None:
    client = redis.Redis.from_url(url)
    again = redis.Redis.from_url(url_of(client))
    fields = ("host", "port", "db", "username", "password", "path")
    kwargs, kwargs_again = client.connection_pool.connection_kwargs, again.connection_pool.connection_kwargs
    assert {f: kwargs.get(f) for f in fields} == {f: kwargs_again.get(f) for f in fields}
    assert again.connection_pool.connection_class is client.connection_pool.connection_class


def test_interrupting_the_kernel_leaves_the_embedded_server_and_local_worker_running(tmp_path) -> None:
    """Jupyter's interrupt signals the kernel's whole process group: rtq's children must not be in it."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET")}
    env["RTQ_NB_TEST"] = token
    flag = tmp_path / "busy"
    nb = nbformat.v4.new_notebook()
    client = NotebookClient(nb, kernel_name="python3", timeout=60, allow_errors=True)

    def run(source: str) -> list[dict[str, object]]:
        cell = nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
        client.execute_cell(cell, len(nb.cells) - 1)
        return list(cell.outputs)

    try:
        with client.setup_kernel(env=env):
            out = run("import rtq\nq = rtq.connect()\nworker = rtq.local_worker(q, 'default')")
            assert out == [], out
            busy = nbformat.v4.new_code_cell(
                f"import time\nopen({str(flag)!r}, 'w').close()\nwhile True:\n    time.sleep(0.05)"
            )
            nb.cells.append(busy)

            def execute() -> None:  # in a thread with its own event loop, closed after (no leaked loop)
                loop = asyncio.new_event_loop()
                try:
                    loop.run_until_complete(client.async_execute_cell(busy, len(nb.cells) - 1))
                finally:
                    loop.close()

            runner = threading.Thread(target=execute)
            runner.start()
            try:
                wait_for(flag.exists, 30, "the busy cell to start")
                run_sync(client.km.interrupt_kernel)()
            finally:
                runner.join(60)
            assert [o.get("ename") for o in busy.outputs] == ["KeyboardInterrupt"], busy.outputs
            out = run("print(worker.running, q.redis.ping(), rtq.Executor(q).submit(lambda: 6 * 7).result(30))")
            assert [o.get("text") for o in out] == ["True True 42\n"], out
            run_sync(client.km.shutdown_kernel)(now=False)  # a clean exit runs the kernel's atexit
        wait_for(lambda: not processes_with_env("RTQ_NB_TEST", token), 30, "the server and worker to exit")
    finally:
        for pid in processes_with_env("RTQ_NB_TEST", token):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_url_of_a_sentinel_client_names_its_sentinels_and_service() -> None:
    from rtq.backend.connections import client_from_url

    url = "redis+sentinel://:p%40ss@127.0.0.1:26390,127.0.0.1:26391/mymaster/2"
    assert url_of(client_from_url(url)) == url  # no sentinel is asked: the client connects lazily
