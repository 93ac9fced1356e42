"""Task functions for the reliability tests (``--task-fn relfns:task``).

Each action leaves traces in files the test names (which process started it, how it ended), so
a test can tell attempts apart without trusting the worker's own bookkeeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from pathlib import Path
from typing import Any

from rtq.errors import TaskCancelled
from rtq.task import RedisTask


def _append(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def task(t: RedisTask) -> Any:
    p = t.params
    action = p["action"]
    if action == "echo":
        return p["value"]
    if action == "wait":
        # Runs until the file ``release`` exists; with ``update`` it reports progress meanwhile.
        _append(p.get("started"), str(os.getpid()))
        deadline = time.time() + p.get("max_seconds", 60)
        try:
            while not os.path.exists(p["release"]) and time.time() < deadline:
                if p.get("update"):
                    try:
                        t.update(0, 1)
                    except TaskCancelled:
                        _append(p.get("ended"), "update raised TaskCancelled")
                        raise
                time.sleep(0.01)
        except TaskCancelled as exc:
            _append(p.get("ended"), f"stopped: {type(exc).__name__}")
            raise
        _append(p.get("ended"), "released")
        if p.get("result_bytes"):  # a result with out-of-band buffers (stored apart from the record)
            import numpy

            if p.get("result_parts"):  # in parts under 1 MiB: frames of the record, not buffers by digest
                n = p["result_parts"]
                return [numpy.zeros(p["result_bytes"] // n, dtype=numpy.uint8) for _ in range(n)]
            return numpy.zeros(p["result_bytes"], dtype=numpy.uint8)
        return os.getpid()
    if action == "sleep":  # one long C call: no bytecode runs until it returns
        _append(p.get("started"), str(os.getpid()))
        time.sleep(p["seconds"])
        return os.getpid()
    if action == "hold_gil":
        # A C call that keeps the GIL (PyDLL does not release it): every thread of the worker
        # process freezes, as with a long numpy call or a C extension loop.
        _append(p.get("started"), str(os.getpid()))
        libc = ctypes.PyDLL(ctypes.util.find_library("c"))
        libc.usleep(ctypes.c_uint(int(p["seconds"] * 1_000_000)))
        return os.getpid()
    if action == "log":  # soak: one line per execution, then a little work
        _append(p["log"], f"{t.id} {os.getpid()}")
        time.sleep(p["seconds"])
        return t.id
    raise ValueError(f"unknown action {action!r}")


def pids(path: Path) -> list[int]:
    """The pids written to ``path`` by ``started``, in order."""
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def serve_with_a_keyword_client(url: str, name: str, lease: float) -> None:
    """Serve ``name`` with :func:`task`, on a client made the way seed-API users make one.

    ``redis.Redis(host=..., port=..., password=...)``, not ``from_url``: that client's settings
    are redis-py's full defaults (in redis-py 8.1, ``socket_keepalive_options`` is a sentinel
    object), which is what the worker's heartbeat helper is handed.
    """
    from urllib.parse import unquote, urlsplit

    import redis

    from rtq.task_queue import RedisTaskQueue

    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    client = redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, password=password)
    queue = RedisTaskQueue(client, "test", timeout=30, interval=0.5, task_fn=task)
    queue.listener([name], workers=1, lease=lease).run()
