"""Functions that progress/output tests ship to workers (by value: rtq ships local modules so)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import rtq


def wait_for_file(path: str, seconds: float = 20.0, nag: str | None = None) -> None:
    """Block until ``path`` exists (the test creates it once it saw the task's output)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {path}: the task's output never reached the test")
        if nag:
            print(nag, flush=True)
        time.sleep(0.05 if not nag else 0.2)


def counted(n: int, desc: str = "steps", step: float = 0.0) -> int:
    """Walk an ``rtq.tqdm`` bar of ``n`` steps and say so."""
    print(f"counting to {n}")
    total = 0
    for i in rtq.tqdm(range(n), desc=desc, mininterval=0):
        total += i
        if step:
            time.sleep(step)
    print("counted")
    return total


def nested(outer: int, inner: int) -> int:
    """Nested ``rtq.tqdm`` bars; the outer one changes its description as it goes."""
    steps = 0
    with rtq.tqdm(total=outer, desc="epochs", mininterval=0) as bar:
        for epoch in range(outer):
            for _ in rtq.tqdm(range(inner), leave=False, mininterval=0):
                steps += 1
            bar.set_description(f"epoch {epoch}")
            bar.update()
    return steps


def chatty_then_fail(flag: str) -> None:
    """Writes to stdout, stderr, logging and a library's tqdm; waits for ``flag``; then fails."""
    from tqdm import tqdm as library_tqdm

    print("ready")
    wait_for_file(flag)
    print("to stderr", file=sys.stderr)
    logging.getLogger("user.lib").warning("a logged warning")
    for _ in library_tqdm(range(3), desc="library bar"):
        pass
    print("last words before the failure")
    raise ValueError("boom after output")


def interleaved(tag: str, lines: int) -> str:
    """Prints ``lines`` lines tagged ``tag``, meeting the other task at a barrier between them.

    The barrier lives in the worker process (this module travels by value, once per task), so
    two tasks of one worker really write in turns.
    """
    barrier = sys.__dict__.setdefault("_rtq_test_barrier", threading.Barrier(2))
    for i in range(lines):
        print(f"{tag} {i}")
        if i % 10 == 9:
            sys.stderr.write(f"{tag} err {i}\n")
        barrier.wait(timeout=20)
    return tag


def ticking_until(flag: str, n: int) -> int:
    """Nags on stdout until ``flag`` exists, then walks an ``rtq.tqdm`` bar of ``n`` steps."""
    wait_for_file(flag, nag="tick")
    for _ in rtq.tqdm(range(n), desc="crunching", mininterval=0):
        pass
    print("work done")
    return n


def maybe_fail(i: int) -> int:
    if i % 10 == 3:
        raise ValueError(f"bad {i}")
    return i
