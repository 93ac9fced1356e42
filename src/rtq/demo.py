"""``rtq demo``: the whole product on one machine, in one command.

It starts an embedded server and worker processes, ships a batch of tasks through the queue,
and prints each result with its timings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .calls import Call
from .connection import connect
from .server import EmbeddedServer
from .task import TaskExecutePolicy

__all__ = ["run_demo"]


def slow_square(x: int) -> int:
    """A stand-in for real work: a little CPU, a little waiting."""
    time.sleep(0.05)
    return x * x


def start_workers(url: str, count: int, names: tuple[str, ...] = ("demo",)) -> list[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "rtq", "worker", *names, "--url", url, "--workers", "4"]
    return [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(tasks: int = 24, workers: int = 2) -> int:
    started = time.perf_counter()
    with EmbeddedServer() as server:
        print(f"embedded server at {server.url} ({os.path.basename(server.binary)}), "
              f"up in {time.perf_counter() - started:.2f}s")
        queue = connect(server.url, timeout=60, interval=1)
        procs = start_workers(server.url, workers)
        try:
            deadline = time.monotonic() + 30
            while not queue.is_listened("demo"):
                if time.monotonic() > deadline:
                    print("workers did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print(f"{workers} worker process(es) listening on 'demo'")

            def one(i: int) -> tuple[int, int, float]:
                t0 = time.perf_counter()
                value = queue.query(f"demo-{i}", "demo", Call(slow_square, (i,)), policy=TaskExecutePolicy.Remote)
                return i, value, time.perf_counter() - t0

            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, range(tasks)))
            wall = time.perf_counter() - t0
            print(f"{'task':>6} {'result':>8} {'seconds':>8}")
            for i, value, seconds in results:
                assert value == i * i, (i, value)
                print(f"{i:>6} {value:>8} {seconds:>8.3f}")
            print(f"{tasks} tasks in {wall:.2f}s ({tasks / wall:.1f} tasks/s) on {workers} worker(s)")
        finally:
            stop_workers(procs)
    return 0
