"""Scale-out Redis figures: a 3-master cluster next to one server, ``durable=True`` next to without.

    python benchmarks/run.py --cluster     # round trip and throughput: cluster vs one server
    python benchmarks/run.py --sentinel    # the same, durable vs not, and failover figures

Starts its own servers (``/usr/bin/redis-server``, loopback, no persistence, through the tests'
``topologies`` module) and ``rtq worker`` processes, and stops them all on exit. Prints one
Markdown table.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROUND_TRIPS = 300
THROUGHPUT = 2000


def noop() -> None:
    return None


def measure(queue: Any) -> dict[str, float]:
    """Median and p99 no-op round trip (ms) and no-op throughput (tasks/s) through ``Executor``."""
    import rtq

    with rtq.Executor(queue, "bench") as ex:
        for _ in range(20):
            ex.submit(noop).result(30)  # warm up
        trips = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            ex.submit(noop).result(30)
            trips.append(time.perf_counter() - start)
        start = time.perf_counter()
        list(ex.map(lambda _: None, range(THROUGHPUT), timeout=120))
        rate = THROUGHPUT / (time.perf_counter() - start)
    trips.sort()
    return {"median_ms": statistics.median(trips) * 1e3, "p99_ms": trips[int(len(trips) * 0.99)] * 1e3, "rate": rate}


def failovers(queue: Any, deployment: Any, rounds: int) -> dict[str, float]:
    """Submit through ``rounds`` ``SENTINEL FAILOVER``s: seconds until all settled, tasks lost."""
    import rtq
    from rtq.errors import RtqConnectionError, TaskLost

    settle, lost, acknowledged = [], 0, 0
    with rtq.Executor(queue, "bench") as ex:
        for _ in range(rounds):
            futs = [ex.submit(time.sleep, 0.01) for _ in range(100)]
            deployment.failover()
            at = time.monotonic()
            for _ in range(100):
                try:
                    futs.append(ex.submit(time.sleep, 0.01))
                except RtqConnectionError:  # NotReplicated included: not acknowledged
                    pass
            wait(futs, timeout=60)
            settle.append(time.monotonic() - at)
            acknowledged += len(futs)
            lost += sum(isinstance(f.exception(), TaskLost) for f in futs if f.done())
    return {"settle_s": max(settle), "lost": lost, "acknowledged": acknowledged}


def run(url: str, prefix: str, procs: list[Any], *, extra: tuple[str, ...] = (), **options: Any) -> Any:
    """Two ``rtq worker`` processes (4 slots each) on ``prefix``, and a queue on it."""
    import rtq
    from topologies import start_worker

    for _ in range(2):
        procs.append(start_worker(url, "bench", prefix=prefix, args=("--workers", "4", *extra)))
    return rtq.connect(url, prefix, timeout=60, interval=0.5, **options)


def main(argv: list[str]) -> int:
    from topologies import REDIS_SERVER, Cluster, Deployment, Sentinels, stop_workers

    rows: list[tuple[str, dict[str, float]]] = []
    notes: list[str] = []
    procs: list[Any] = []
    deployments: list[Any] = []
    try:
        if "--cluster" in argv:
            single = Deployment(REDIS_SERVER)
            deployments.append(single)
            url = f"redis://127.0.0.1:{single.server()}/0"
            rows.append(("one server", measure(run(url, "one", procs))))
            cluster = Cluster(REDIS_SERVER).start()
            deployments.append(cluster)
            queue = run(cluster.url, "clu", procs, extra=("--cluster",), cluster=True)
            rows.append(("3-master cluster", measure(queue)))
        if "--sentinel" in argv:
            sentinels = Sentinels(REDIS_SERVER).start()
            deployments.append(sentinels)
            plain = run(sentinels.url, "plain", procs)
            durable = run(sentinels.url, "dur", procs, extra=("--durable",), durable=True)
            rows.append(("sentinel, durable=False", measure(plain)))
            rows.append(("sentinel, durable=True", measure(durable)))
            for name, queue in (("durable=False", plain), ("durable=True", durable)):
                figures = failovers(queue, sentinels, 3)
                notes.append(
                    f"{name}: 3 SENTINEL FAILOVERs, 200 submits each: every call settled within "
                    f"{figures['settle_s']:.1f} s of its failover; {figures['lost']:.0f} of "
                    f"{figures['acknowledged']:.0f} acknowledged tasks lost (TaskLost)"
                )
    finally:
        stop_workers(procs)
        for deployment in deployments:
            deployment.stop()
    print("| deployment | round trip median (ms) | p99 (ms) | no-op throughput (tasks/s) |")
    print("|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['median_ms']:.2f} | {row['p99_ms']:.2f} | {row['rate']:.0f} |")
    for note in notes:
        print(f"\n{note}")
    return 0
