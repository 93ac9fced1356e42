"""``rtq demo``: the whole product on one machine, in one command.

It starts an embedded server and two worker processes, ships a batch of closures to them the
way a notebook would — one capturing a variable, one crunching a numpy array, one failing on
purpose, and a batch of small jobs reporting progress with ``rtq.tqdm`` — shows live progress
bars, and ends with a summary table of what ran where and how long it took.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

__all__ = ["run_demo"]


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


def _jobs() -> list[tuple[str, Any, tuple[Any, ...]]]:
    """The closures a notebook would ship: built here, at run time, like notebook code."""
    import rtq

    learning_rate = 0.25  # a "notebook variable" the closure captures

    def train_step(steps: int) -> float:
        loss = 1.0
        for _ in rtq.tqdm(range(steps), desc="train"):
            loss *= 1 - learning_rate / 10
            time.sleep(0.01)
        return round(loss, 4)

    def crunch(n: int) -> float:
        import numpy as np

        task = rtq.current_task()
        rng = np.random.default_rng(0)
        total = 0.0
        for i in range(10):
            m = rng.standard_normal((n, n))
            total += float(np.linalg.norm(m @ m.T))
            if task is not None:
                task.update(i + 1, 10)
        return round(total, 1)

    def fail_on_purpose(x: int) -> float:
        return x / 0

    def where(_: int) -> str:
        return f"pid {os.getpid()}"

    jobs: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("captures learning_rate", train_step, (60,)),
        ("numpy 300x300 matmuls", crunch, (300,)),
        ("fails on purpose", fail_on_purpose, (1,)),
    ]
    jobs += [(f"small job {i}", train_step, (20 + 5 * i,)) for i in range(5)]
    jobs += [(f"where {i}", where, (i,)) for i in range(4)]
    return jobs


def run_demo(tasks: int = 0, workers: int = 2) -> int:
    """Run the demo; returns the process exit code."""
    import rtq
    from rtq.server import EmbeddedServer

    started = time.perf_counter()
    with EmbeddedServer() as server:
        print(f"embedded server {os.path.basename(server.binary)} at {server.url}, "
              f"up in {time.perf_counter() - started:.2f}s")
        queue = rtq.connect(server.url, timeout=120, interval=1)
        procs = start_workers(server.url, workers)
        try:
            deadline = time.monotonic() + 30
            while not queue.is_listened("demo"):  # the workers' own marker, set when they start
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    print("the workers did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print(f"{workers} worker processes listening on 'demo'\n")
            jobs = _jobs()
            if tasks:
                jobs = jobs[:tasks]
            with rtq.Executor(queue, "demo") as ex:
                t0 = time.perf_counter()
                futures = [(label, ex.submit(fn, *args), time.perf_counter()) for label, fn, args in jobs]
                rtq.progress(*(f for _, f, _ in futures))
                rows = []
                for label, fut, submitted in futures:
                    try:
                        outcome = repr(fut.result())
                        ok = "ok"
                    except Exception as exc:
                        outcome, ok = f"{type(exc).__name__}: {exc}", "FAILED"
                    rows.append((label, ok, outcome))
                wall = time.perf_counter() - t0
            width = max(len(r[0]) for r in rows)
            print(f"\n{'job':<{width}}  {'status':<6}  outcome")
            for label, ok, outcome in rows:
                print(f"{label:<{width}}  {ok:<6}  {outcome}")
            failed = sum(r[1] != "ok" for r in rows)
            print(f"\n{len(rows)} jobs on {workers} workers in {wall:.2f}s; {failed} failed (on purpose)")
            return 0 if failed == 1 else 1
        finally:
            stop_workers(procs)
