"""What progress reporting and output streaming cost a task, measured on a real worker.

1. Overhead: a task runs the same loop of 10^6 steps (each doing ``--work-us`` microseconds of
   pure-Python work) without reporting, with ``task.update(i, n)`` on every step, with
   ``rtq.tqdm`` around the iterable, with ``rtq.tqdm(total=n).update()`` on every step, and with
   plain ``tqdm`` both ways (what tqdm itself costs, without rtq). The steps run in chunks; each
   chunk runs every variant back to back in the worker, timed in CPU time of the task's thread
   (``time.thread_time``); the slowdown is the median over chunks of the paired ratio to the
   bare loop, so load from other processes on a shared machine hits all variants alike (the
   order rotates from chunk to chunk; "bare loop again" shows the noise left). The same again
   with no work per step gives the bare cost of one call.
2. Delay: a task prints time stamps (sparse: one every 200 ms; continuous: one every 1 ms) and
   the client measures when each reaches it through :func:`rtq.watch.watch`. Output is sent at
   once after a quiet spell, else batched every ``rtq.worker.capture.FLUSH_INTERVAL`` (50 ms).

Usage: ``python benchmarks/progress_overhead.py [--url redis://...] [--steps N] [--work-us W]``
(without ``--url`` it starts an embedded server). Prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

import rtq
from rtq.task_queue import RedisTaskQueue
from rtq.watch import watch

ROOT = Path(__file__).resolve().parent.parent


def measure_overhead(steps: int, work_us: float, repeat: int, chunks: int = 200) -> dict[str, Any]:
    """Runs inside the worker: times each variant of the loop, paired chunk by chunk.

    Each variant is one loop of ``steps`` steps (one bar, one count to ``steps``, so Redis sees
    what a real loop sends: about 10 writes a second and one final write), walked in ``chunks``
    slices. Each chunk runs a slice of every variant back to back, so a burst of load from
    elsewhere hits all of them alike; the slowdown reported is the median over chunks of
    (variant / bare loop) in the task thread's CPU time.
    """
    import io
    import statistics
    import time
    from itertools import islice

    from tqdm.std import tqdm as plain_tqdm

    import rtq

    task = rtq.current_task()
    assert task is not None

    def calibrate() -> int:
        size = 1
        while True:
            start = time.thread_time()
            for _ in range(20_000):
                sum(range(size))
            per_call = (time.thread_time() - start) / 20_000 * 1e6
            if per_call >= work_us * 0.98 or size > 1 << 20:
                return size
            size = max(size + 1, int(size * work_us / max(per_call, 1e-3)))

    size = calibrate() if work_us > 0 else 0

    def work() -> None:
        if size:
            sum(range(size))

    def loops() -> dict[str, Any]:
        """Fresh loops of every variant; each call of one walks its next ``n`` steps."""
        steps_of = {"bare": iter(range(steps)), "again": iter(range(steps)), "update": iter(range(1, steps + 1))}
        steps_of["rtq iter"] = iter(rtq.tqdm(range(steps)))
        steps_of["tqdm iter"] = iter(plain_tqdm(range(steps), file=io.StringIO()))
        steps_of["rtq bar"], steps_of["tqdm bar"] = iter(range(steps)), iter(range(steps))
        rtq_bar, plain_bar = rtq.tqdm(total=steps), plain_tqdm(total=steps, file=io.StringIO())

        def walk(key: str) -> Any:
            def run(n: int) -> None:
                for _ in islice(steps_of[key], n):
                    work()

            return run

        def update(n: int) -> None:
            for i in islice(steps_of["update"], n):
                work()
                task.update(i, steps)

        def bar_update(bar: Any, key: str) -> Any:
            def run(n: int) -> None:
                for _ in islice(steps_of[key], n):  # same iteration cost as the others
                    work()
                    bar.update()

            return run

        return {
            "bare loop": walk("bare"),
            "task.update": update,
            "rtq.tqdm(iterable)": walk("rtq iter"),
            "rtq.tqdm .update()": bar_update(rtq_bar, "rtq bar"),
            "tqdm(iterable), no rtq": walk("tqdm iter"),
            "tqdm .update(), no rtq": bar_update(plain_bar, "tqdm bar"),
            "bare loop again": walk("again"),  # the control: how much two identical loops differ
            "_close": lambda: [rtq_bar.close(), plain_bar.close(), *(next(it, None) for it in steps_of.values())],
        }

    n = steps // chunks
    times: dict[str, list[float]] = {}
    for _ in range(repeat):
        variants = loops()
        close = variants.pop("_close")
        order = list(variants.items())
        for chunk in range(chunks):
            shift = chunk % len(order)  # rotate, so no variant always runs right after another
            for name, fn in order[shift:] + order[:shift]:
                start = time.thread_time()  # CPU time of this thread: other processes do not count
                fn(n)
                times.setdefault(name, []).append(time.thread_time() - start)
        close()
    bare_times = times["bare loop"]
    results = {}
    for name, ts in times.items():
        paired = list(zip(ts, bare_times, strict=True))
        results[name] = {
            "seconds": sum(ts) / repeat,
            "ns_per_step": statistics.median((t - b) / n * 1e9 for t, b in paired),
            "slowdown_pct": statistics.median((t / b - 1) * 100 for t, b in paired),
        }
    return {"steps": n * chunks, "work_us": work_us, "repeat": repeat, "variants": results}


def print_stamps(count: int, gap: float) -> None:
    """Runs inside the worker: prints ``count`` time stamps, ``gap`` seconds apart."""
    import time

    for _ in range(count):
        print(repr(time.time()), flush=True)
        deadline = time.perf_counter() + gap
        while time.perf_counter() < deadline:  # spin: sleep() granularity would blur 1 ms gaps
            pass


def measure_delay(ex: rtq.Executor, count: int, gap: float) -> dict[str, float]:
    delays: list[float] = []
    partial = [""]

    def on_output(stream: str, text: str) -> None:
        now = time.time()
        lines = (partial[0] + text).split("\n")
        partial[0] = lines.pop()
        delays.extend(now - float(line) for line in lines if line)

    fut = ex.submit(print_stamps, count, gap)
    state = watch(fut, on_output=on_output, timeout=120)
    assert state == "done" and len(delays) == count, (state, len(delays))
    ms = sorted(d * 1000 for d in delays)
    return {
        "prints": count,
        "gap_ms": gap * 1000,
        "median_ms": statistics.median(ms),
        "p95_ms": ms[int(len(ms) * 0.95) - 1],
        "max_ms": ms[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="Redis URL (default: an embedded server)")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--work-us", type=float, default=5.0, help="work per loop step, microseconds")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=200, help="paired chunks the steps are split into")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        from rtq.server import EmbeddedServer

        server = EmbeddedServer()
        url = server.start().url
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "rtq", "worker", "bench", "--url", url, "--prefix", "bench", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        queue = RedisTaskQueue(redis.Redis.from_url(url), "bench", timeout=3600, interval=0.5)
        deadline = time.monotonic() + 30
        while not queue.is_listened("bench"):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the benchmark worker did not start")
            time.sleep(0.05)
        ex = rtq.Executor(queue, "bench", timeout=3600)
        overhead = ex.submit(measure_overhead, args.steps, args.work_us, args.repeat, args.chunks).result()
        zero = ex.submit(measure_overhead, args.steps, 0.0, args.repeat, args.chunks).result()
        delays = [measure_delay(ex, 20, 0.2), measure_delay(ex, 1000, 0.001)]
        ex.shutdown()
    finally:
        worker.terminate()
        worker.wait(30)
        if server is not None:
            server.stop()

    if args.json:
        print(json.dumps({"overhead": overhead, "overhead_no_work": zero, "delay": delays}, indent=2))
        return 0
    for result in (overhead, zero):
        print(
            f"\n{result['steps']:,} steps of {result['work_us']:g} us work each (a bare step took "
            f"{result['variants']['bare loop']['seconds'] / result['steps'] * 1e6:.2f} us; "
            f"x{result['repeat']}, median of paired chunks, task thread CPU time):"
        )
        for name, v in result["variants"].items():
            pct = f"{v['slowdown_pct']:+6.1f} %" if result["work_us"] else ""
            print(f"  {name:24s} {v['seconds']:7.3f} s   {v['ns_per_step']:+6.0f} ns/step {pct}")
    print("\nremote print -> client callback (rtq.watch.watch):")
    for d in delays:
        print(
            f"  {d['prints']:5d} prints every {d['gap_ms']:g} ms: median {d['median_ms']:.1f} ms, "
            f"p95 {d['p95_ms']:.1f} ms, max {d['max_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
