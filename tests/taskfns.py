"""Task functions that test workers load with ``--task-fn taskfns:NAME``."""

from __future__ import annotations

import os
import time
from typing import Any

from rtq.task import RedisTask


class Boom(Exception):
    """A task error with a type the caller must see again."""


def echo_task(task: RedisTask) -> Any:
    """Runs the action named in ``params`` (a dict) and returns its outcome."""
    p = task.params
    if not isinstance(p, dict):
        return p
    action = p.get("action", "echo")
    if action == "echo":
        return p.get("value")
    if action == "none":
        return None
    if action == "raise":
        raise Boom(p.get("message", "boom"))
    if action == "sleep":
        time.sleep(p["seconds"])
        return p.get("value", "slept")
    if action == "progress":
        steps = p.get("steps", 10)
        for i in range(1, steps + 1):
            task.update(i, steps)
            time.sleep(p.get("step_seconds", 0.05))
        return "progressed"
    if action == "pid":
        return os.getpid()
    if action == "until_file":
        deadline = time.time() + p.get("max_seconds", 60)
        while not os.path.exists(p["path"]) and time.time() < deadline:
            task.update(0, 1)
            time.sleep(0.02)
        return p.get("value", "released")
    if action == "touch_then_wait":
        with open(p["started"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
        deadline = time.time() + p.get("max_seconds", 60)
        while not os.path.exists(p["path"]) and time.time() < deadline:
            time.sleep(0.02)
        return p.get("value", os.getpid())
    raise ValueError(f"unknown action {action!r}")


def progress_wait_task(task: RedisTask) -> Any:
    """Reports progress ``(current, total)`` from params once, then waits until ``path`` exists."""
    p = task.params
    task.update(p["current"], p["total"])
    deadline = time.time() + p.get("max_seconds", 30)
    while not os.path.exists(p["path"]) and time.time() < deadline:
        time.sleep(0.02)
    return "finished"


def update_until_expired_task(task: RedisTask) -> Any:
    """Calls ``task.update()`` until it raises; records ``type|is TimeoutError|seconds past expiry``
    atomically in ``params['path']``, then re-raises."""
    p = task.params
    deadline = time.time() + p.get("max_seconds", 30)
    i = 0
    while time.time() < deadline:
        i += 1
        try:
            task.update(i, 1_000_000)
        except Exception as exc:
            tmp = p["path"] + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{type(exc).__name__}|{isinstance(exc, TimeoutError)}|{time.time() - task.expiry}")
            os.replace(tmp, p["path"])
            raise
        time.sleep(0.01)
    return "never expired"
