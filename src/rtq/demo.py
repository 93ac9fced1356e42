"""``rtq demo``: the whole product on one machine, in one command.

It starts an embedded server and two worker processes, ships a batch of closures to them the
way a notebook would — one capturing a variable, one crunching a numpy array, one failing on
purpose, and a batch of small jobs reporting progress with ``rtq.tqdm`` — shows live progress
bars, and ends with a summary table of what ran where and how long it took.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from typing import Any

__all__ = ["run_demo"]


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
    from rtq.connection import redact_url
    from rtq.server import EmbeddedServer

    started = time.perf_counter()
    with EmbeddedServer() as server:
        print(
            f"embedded server {os.path.basename(server.binary)} at {redact_url(server.url)}, "
            f"up in {time.perf_counter() - started:.2f}s"
        )
        queue = rtq.connect(server.url, timeout=120, interval=1)
        with ExitStack() as stack:
            try:
                for _ in range(workers):
                    stack.enter_context(rtq.local_worker(queue, "demo", workers=4))
            except rtq.errors.RtqError as exc:
                print(f"the workers did not start: {exc}", file=sys.stderr)
                return 1
            print(f"{workers} worker processes listening on 'demo'\n")
            jobs = _jobs()
            if tasks:
                jobs = jobs[:tasks]
            with rtq.Executor(queue, "demo") as ex:
                t0 = time.perf_counter()
                finished: dict[str, float] = {}

                def ended(fut: Any) -> None:
                    finished.setdefault(fut.task_id, time.perf_counter())

                futures = []
                for label, fn, args in jobs:
                    fut = ex.submit(fn, *args)
                    fut.add_done_callback(ended)
                    futures.append((label, fut, time.perf_counter()))
                rtq.progress(*(f for _, f, _ in futures))
                rows = []
                for label, fut, submitted in futures:
                    try:
                        outcome = repr(fut.result())
                        ok = "ok"
                    except Exception as exc:
                        outcome, ok = f"{type(exc).__name__}: {exc}", "FAILED"
                    rows.append((label, ok, f"{finished[fut.task_id] - submitted:7.2f}", outcome))
                wall = time.perf_counter() - t0
            width = max(len(r[0]) for r in rows)
            print(f"\n{'job':<{width}}  {'status':<6}  {'seconds':>7}  outcome")
            for label, ok, seconds, outcome in rows:
                print(f"{label:<{width}}  {ok:<6}  {seconds}  {outcome}")
            failed = sum(r[1] != "ok" for r in rows)
            print(f"\n{len(rows)} jobs on {workers} workers in {wall:.2f}s; {failed} failed (on purpose)")
            return 0 if failed == 1 else 1
