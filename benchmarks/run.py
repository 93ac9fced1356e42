#!/usr/bin/env python
"""rtq against the queues users would pick instead (RQ, Celery, arq), in one run.

Starts its own server (rtq's embedded one; ``--redis-server`` also the ``redis-server`` on PATH)
and its own worker processes, then measures, on the same server:

* the floor: raw redis-py PING (median) and SET+GET of the payloads (MB/s), measured in
  alternation with rtq's own samples, while rtq's workers are up, so both see the same machine;
* rtq: no-op round trip through ``RedisTaskQueue.query()`` and ``Executor.submit().result()``
  (median, p99), throughput of no-op closures through ``Executor.map`` on 2 worker processes
  and through a loop of ``Executor.submit`` calls, echo of 1, 32 and 256 MiB numpy arrays and of
  32 MiB as ``bytes`` and as DataFrames (``user_paths.py``), and the cost of ``task.update()``
  inside a task;
* RQ (SimpleWorker and the default forking Worker), Celery (prefork, Redis broker and backend)
  and arq (poll delay 0.01 s): the same round trip, throughput and 32 MiB echo.

Prints a Markdown table, writes ``benchmarks/results/latest.json`` and ``benchmarks/RESULTS.md``.
Every process it starts is stopped on exit, Ctrl-C included. Peers that are not installed are
skipped (``pip install -e ".[bench]"`` installs them).

    python benchmarks/run.py                 # everything, a few minutes on 2 cores
    python benchmarks/run.py --quick         # fewer repetitions
    python benchmarks/run.py --only rtq      # the floor and rtq alone
    python benchmarks/run.py --cluster --sentinel   # scale-out deployments (bench_scaleout.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402
import dashboard_load  # noqa: E402
import digests as digests_bench  # noqa: E402
import sessions_bench  # noqa: E402
import user_paths  # noqa: E402

MiB = 1 << 20
MB = 1_000_000
QUEUE = "bench"
PREFIX = "bench"
PEERS = ("rq-simple", "rq-fork", "celery", "arq")
ROUNDS = 20
"""Rounds of the round-trip measures, each alternating the floor's PINGs with rtq's trips."""


# -- processes -----------------------------------------------------------------------------
class Processes:
    """Every process this run starts, each in its own process group, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None, grace: float = 10.0) -> None:
        """SIGTERM each process group (workers, their pool children), SIGKILL what is left."""
        targets = list(self.procs if procs is None else procs)
        for proc in targets:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in targets:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in targets:
            # The group too: a worker's children (forked work horses, heartbeat helpers) go with it.
            self._signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc in self.procs:
                self.procs.remove(proc)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # its own group (start_new_session): only what we started


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()
) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a worker exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)  # waiting on other processes to start: nothing to block on


# -- statistics ----------------------------------------------------------------------------
def latency(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "n": len(samples),
        "median_ms": statistics.median(ordered) * 1e3,
        "p99_ms": p99 * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def payload(size: int) -> Any:
    import numpy as np

    return np.frombuffer(np.random.default_rng(size).bytes(size), dtype=np.uint8)


def echo_rate(size: int, samples: list[float]) -> dict[str, float]:
    best, median = min(samples), statistics.median(samples)
    return {
        "bytes": size,
        "n": len(samples),
        "median_s": median,
        "mb_s": size / median / MB,
        "best_mb_s": size / best / MB,
    }


# -- the floor -----------------------------------------------------------------------------
class Floor:
    """Raw redis-py on the same server: PING, and SET+GET of the same bytes rtq echoes.

    rtq measures it in alternation with its own samples (see :func:`bench_rtq`), so the floor and
    rtq see the same machine: on a small shared VM a PING's median moves by 2-3x between moments
    (which core each process wakes on), and a ratio of numbers taken minutes apart measures that.
    """

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.key = f"{PREFIX}|raw|{uuid.uuid4().hex}"
        timed(self.client.ping, 200)  # warm up

    def pings(self, n: int) -> list[float]:
        return timed(self.client.ping, n)

    def set_get(self, data: Any, size: int) -> None:
        self.client.set(self.key, data)  # a memoryview: redis-py sends it without a copy
        back = self.client.get(self.key)
        assert back is not None and len(back) == size

    def queue_trip(self, task_id: str) -> None:
        """One round trip through ``floor_worker.py``: push an id, block until it comes back."""
        queue = self.queue_key
        self.client.rpush(queue, task_id)
        assert self.client.blpop([f"{queue}|done:{task_id}"], 30) is not None, "the floor worker is gone"

    @property
    def queue_key(self) -> str:
        return f"{PREFIX}|floor-queue"

    def close(self) -> None:
        self.client.delete(self.key)
        self.client.close()


def bench_raw(url: str, sizes: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """The floor on its own (when rtq is not measured in this run)."""
    floor = Floor(url)
    out: dict[str, Any] = {"ping": latency(floor.pings(args.pings)), "set_get": {}}
    for size in sizes:
        data = payload(size).data
        samples = timed(lambda data=data, size=size: floor.set_get(data, size), reps(size, args))  # type: ignore[misc]
        out["set_get"][str(size)] = echo_rate(size, samples)
    floor.close()
    return out


def reps(size: int, args: argparse.Namespace) -> int:
    if size >= 128 * MiB:
        return 2 if args.quick else 5
    if size >= 16 * MiB:
        return 3 if args.quick else 5
    return 10 if args.quick else 20


# -- rtq -----------------------------------------------------------------------------------
def bench_rtq(url: str, procs: Processes, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    import cloudpickle
    import redis

    import rtq
    from rtq.calls import Call

    # Shipped by value, as a function defined in a notebook is (the Executor would do this at its
    # first submit; query() is measured first).
    cloudpickle.register_pickle_by_value(bench_tasks)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "rtq",
        "worker",
        QUEUE,
        "--url",
        url,
        "--prefix",
        PREFIX,
        "--workers",
        str(args.slots),
    ]
    workers = [procs.start(cmd, env, logs / f"rtq-worker-{i}.log") for i in range(args.worker_procs)]
    out: dict[str, Any] = {"version": rtq.__version__, "worker_processes": args.worker_procs, "slots": args.slots}
    try:
        q = rtq.connect(url, PREFIX)
        client = redis.Redis.from_url(url)

        def listening() -> bool:
            return client.zcard(q.keys.workers()) >= len(workers) and q.is_listened(QUEUE)

        wait_until(listening, 60, "rtq workers", workers)
        n = args.round_trips
        floor = Floor(url)
        bare = procs.start(
            [sys.executable, str(HERE / "floor_worker.py"), url, floor.queue_key], env, logs / "floor-worker.log"
        )
        workers.append(bare)
        counter = iter(range(10**9))

        def queue_trip() -> None:
            floor.queue_trip(f"f{next(counter)}")

        def query() -> None:
            q.query(f"rt-{next(counter)}", QUEUE, Call(bench_tasks.noop))

        with rtq.Executor(q, QUEUE) as ex:

            def submit() -> None:
                ex.submit(bench_tasks.noop).result(30)

            timed(query, 50)
            timed(submit, 50)
            timed(queue_trip, 50)
            # In rounds, alternating with the floor's PINGs: the ratio compares like with like.
            pings: list[float] = []
            samples: dict[str, list[float]] = {"query": [], "submit": [], "queue": []}
            for _ in range(ROUNDS):
                pings += floor.pings(max(1, args.pings // ROUNDS))
                samples["queue"] += timed(queue_trip, max(1, n // ROUNDS))
                samples["query"] += timed(query, max(1, n // ROUNDS))
                samples["submit"] += timed(submit, max(1, n // ROUNDS))
            out["floor"] = {"ping": latency(pings), "queue": latency(samples["queue"]), "set_get": {}}
            out["query"], out["submit"] = latency(samples["query"]), latency(samples["submit"])
            floor.client.rpush(floor.queue_key, "stop")

            count = args.tasks
            list(ex.map(bench_tasks.noop, range(200), timeout=120))  # warm up
            start = time.perf_counter()
            results = list(ex.map(bench_tasks.noop, range(count), timeout=300))
            elapsed = time.perf_counter() - start
            assert len(results) == count
            out["throughput"] = {"tasks": count, "seconds": elapsed, "tasks_s": count / elapsed}
            out["submit_loop"] = user_paths.submit_loop(ex, count)
            out["footprint"] = footprint(ex, client, args.footprint_tasks)
            out["concurrent"] = concurrent_queries(url, args.concurrent)

            out["echo"] = {}
            for size in args.sizes:
                data = payload(size).copy()

                def echo(data: Any = data, size: int = size) -> None:
                    data[:8] += 1  # new bytes each time: a buffer Redis holds would not be sent again
                    back = ex.submit(bench_tasks.echo, data).result(300)
                    assert back.nbytes == size

                def raw(view: Any = data.data, size: int = size) -> None:
                    floor.set_get(view, size)

                back = ex.submit(bench_tasks.echo, data).result(300)
                assert (back == data).all(), "the echoed array differs"
                del back
                raw()
                rtq_s: list[float] = []
                raw_s: list[float] = []
                for _ in range(reps(size, args)):  # alternating, as above
                    raw_s += timed(raw, 1)
                    rtq_s += timed(echo, 1)
                out["floor"]["set_get"][str(size)] = echo_rate(size, raw_s)
                out["echo"][str(size)] = echo_rate(size, rtq_s)
                del data

            size = 32 * MiB if 32 * MiB in args.sizes else args.sizes[0]
            out["user_echo"] = {"size": size, **user_paths.echoes(ex, floor, size, reps(size, args))}
            out["progress"] = progress_overhead(ex, args.updates)
            out["sessions"] = sessions_bench.measure(url, PREFIX, QUEUE, ex, quick=args.quick)
            out["dashboard"] = dashboard_load.measure(url, seconds=10)  # 20 workers, 200 running tasks
        floor.close()
        client.close()
    finally:
        procs.stop(workers)
    return out


def footprint(ex: Any, client: Any, n: int) -> dict[str, Any]:
    """Server memory (``INFO memory``) before and after ``n`` no-op calls whose results were consumed.

    What a finished, consumed task leaves in Redis: its clean-up rides the client's next wake-up
    (or runs within a second), so the calls before are cleaned up first, those measured once all
    settled, and the figure is taken once the key count stops falling (at most a few seconds).
    """
    gc.collect()
    ex.queue.collector.clean_up()  # what the calls before this one left
    before = client.info("memory")["used_memory"]
    keys_before = client.dbsize()
    results = list(ex.map(bench_tasks.noop, range(n), timeout=600))
    assert len(results) == n
    ex.queue.collector.clean_up()
    settled, last = time.monotonic() + 10, -1
    while time.monotonic() < settled and client.dbsize() != last:
        last = client.dbsize()
        time.sleep(0.2)  # a clean-up in flight on the server: nothing to block on
    after = client.info("memory")["used_memory"]
    return {
        "tasks": n,
        "before_bytes": before,
        "after_bytes": after,
        "bytes_per_task": (after - before) / n,
        "keys_left": client.dbsize() - keys_before,
    }


def concurrent_queries(url: str, n: int) -> dict[str, Any]:
    """``n`` threads each in one ``query()`` no-op on ONE client at once: time and connections used."""
    import threading

    import redis

    import rtq
    from rtq.calls import Call

    name = f"bench-{uuid.uuid4().hex[:6]}"
    q = rtq.connect(url, PREFIX, client_name=name)
    spy = redis.Redis.from_url(url)
    errors: list[BaseException] = []
    gate = threading.Barrier(n + 1)

    def call(i: int) -> None:
        gate.wait()
        try:
            q.query(f"cq-{i}-{uuid.uuid4().hex[:6]}", QUEUE, Call(bench_tasks.noop))
        except BaseException as exc:  # counted, not raised: the figure is how many succeed
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    peak = 0
    gate.wait()
    start = time.perf_counter()
    while any(t.is_alive() for t in threads):
        peak = max(peak, sum(1 for c in spy.client_list() if c.get("name") == name))
        threads[-1].join(0.01)
    elapsed = time.perf_counter() - start
    spy.close()
    return {"calls": n, "seconds": elapsed, "failed": len(errors), "peak_connections": peak}


def progress_overhead(ex: Any, n: int) -> dict[str, Any]:
    """``n`` ``task.update(i, n)`` calls inside a task against a bare loop of ``n`` steps.

    Measured by ``benchmarks/progress_overhead.py`` (no work per step, one pass: the bare cost
    of a call, paired chunk by chunk with the bare loop in the task thread's CPU time).
    """
    import progress_overhead

    result = ex.submit(progress_overhead.measure_overhead, n, 0.0, 1).result(600)
    variants = result["variants"]
    return {
        "updates": result["steps"],
        "bare_s": variants["bare loop"]["seconds"],
        "update_s": variants["task.update"]["seconds"],
        "ns_per_update": variants["task.update"]["ns_per_step"],
        "variants": variants,
    }


# -- peers ---------------------------------------------------------------------------------
def peer_env(url: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in [str(HERE), os.environ.get("PYTHONPATH", "")] if p)
    # C_FORCE_ROOT: Celery refuses pickle as root (containers, CI) unless told; benchmark only.
    return {**os.environ, "PYTHONPATH": path, "BENCH_REDIS_URL": url, "C_FORCE_ROOT": "1"}


def script(name: str) -> str:
    """A console script installed next to this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def bench_rq(url: str, kind: str, procs: Processes, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    import redis
    from rq import Queue, Worker

    queue_name = f"bench-{kind}"
    worker_class = "rq.worker.SimpleWorker" if kind == "rq-simple" else "rq.worker.Worker"
    cmd = [script("rq"), "worker", "-u", url, "-w", worker_class, "-q", queue_name]
    workers = [procs.start(cmd, peer_env(url), logs / f"{kind}-{i}.log") for i in range(args.worker_procs)]
    try:
        conn = redis.Redis.from_url(url)
        queue = Queue(queue_name, connection=conn)
        wait_until(lambda: Worker.count(queue=queue) >= len(workers), 60, f"{kind} workers", workers)

        def result_of(job: Any, timeout: int = 60) -> Any:
            result = job.latest_result(timeout=timeout)  # blocks on the job's result stream
            if result is None or result.type != result.Type.SUCCESSFUL:
                raise RuntimeError(f"{kind} job {job.id} failed: {result and result.exc_string}")
            return result.return_value

        def round_trip() -> None:
            result_of(queue.enqueue(bench_tasks.noop))

        return peer_measure(
            round_trip,
            lambda n: rq_throughput(queue, n, result_of),
            lambda data: result_of(queue.enqueue(bench_tasks.echo, data), 300),
            args,
        )
    finally:
        procs.stop(workers)


def rq_throughput(queue: Any, n: int, result_of: Callable[..., Any]) -> None:
    from rq import Queue

    jobs = []
    for i in range(0, n, 500):
        jobs += queue.enqueue_many([Queue.prepare_data(bench_tasks.noop) for _ in range(min(500, n - i))])
    for job in jobs:
        result_of(job, 300)


def bench_celery(url: str, procs: Processes, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    os.environ["BENCH_REDIS_URL"] = url
    import peer_celery
    from celery import group

    peer_celery = importlib.reload(peer_celery)  # its app reads the URL at import: this server's

    cmd = [
        script("celery"),
        "-A",
        "peer_celery",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(args.worker_procs),
        "-Q",
        peer_celery.QUEUE,
        "-l",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    workers = [procs.start(cmd, peer_env(url), logs / "celery.log")]
    # A result collected by the cyclic GC unsubscribes from inside the pubsub read it interrupts
    # (AsyncResult.__del__), which can hang Celery's client for good: collect only at the end.
    gc.disable()
    try:

        def ready() -> bool:
            replies = peer_celery.app.control.ping(timeout=0.5)
            return bool(replies)

        wait_until(ready, 60, "celery worker", workers)

        def round_trip() -> None:
            peer_celery.noop.delay().get(timeout=60)

        def throughput(n: int) -> None:
            group(peer_celery.noop.s() for _ in range(n)).apply_async().get(timeout=600)

        return peer_measure(round_trip, throughput, lambda data: peer_celery.echo.delay(data).get(timeout=300), args)
    finally:
        # Celery's results unsubscribe when collected, reconnecting (with long retries) if the
        # server is gone: collect them now, while it still runs.
        gc.enable()
        gc.collect()
        procs.stop(workers)


def bench_arq(url: str, procs: Processes, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    os.environ["BENCH_REDIS_URL"] = url
    import peer_arq
    from arq import create_pool

    peer_arq = importlib.reload(peer_arq)  # its settings read the URL at import: this server's

    cmd = [script("arq"), "peer_arq.WorkerSettings"]
    workers = [procs.start(cmd, peer_env(url), logs / f"arq-{i}.log") for i in range(args.worker_procs)]
    loop = asyncio.new_event_loop()
    try:
        pool = loop.run_until_complete(create_pool(peer_arq.WorkerSettings.redis_settings))

        async def call(fn: str, *a: Any, timeout: float = 60) -> Any:
            job = await pool.enqueue_job(fn, *a)
            return await job.result(timeout=timeout, poll_delay=peer_arq.POLL_DELAY)

        async def many(n: int) -> None:
            jobs = await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(n)))
            for job in jobs:
                await job.result(timeout=600, poll_delay=peer_arq.POLL_DELAY)

        loop.run_until_complete(asyncio.wait_for(call("noop"), 60))  # up and serving
        time.sleep(1.0)  # let the second worker finish starting too
        return peer_measure(
            lambda: loop.run_until_complete(call("noop")),
            lambda n: loop.run_until_complete(many(n)),
            lambda data: loop.run_until_complete(call("echo", data, timeout=300)),
            args,
        )
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(pool.aclose())
        loop.close()
        procs.stop(workers)


def peer_measure(
    round_trip: Callable[[], Any],
    throughput: Callable[[int], Any],
    echo: Callable[[Any], Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The peer's round trip, throughput and 32 MiB echo, measured the same way for each."""
    timed(round_trip, 20)
    out: dict[str, Any] = {"query": latency(timed(round_trip, args.peer_round_trips))}
    throughput(50)
    start = time.perf_counter()
    throughput(args.peer_tasks)
    elapsed = time.perf_counter() - start
    out["throughput"] = {"tasks": args.peer_tasks, "seconds": elapsed, "tasks_s": args.peer_tasks / elapsed}
    size = args.peer_echo
    data = payload(size)
    back = echo(data)
    assert (back == data).all(), "the echoed array differs"
    del back
    out["echo"] = {str(size): echo_rate(size, timed(lambda: echo(data), reps(size, args)))}
    return out


def available(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None when it can."""
    module = {"rq-simple": "rq", "rq-fork": "rq", "celery": "celery", "arq": "arq"}[peer]
    if importlib.util.find_spec(module) is None:
        return f'{module} is not installed (pip install -e ".[bench]")'
    return None


# -- one server ----------------------------------------------------------------------------
def bench_server(label: str, url: str, procs: Processes, logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("server")
    version = f"Valkey {info['valkey_version']}" if info.get("valkey_version") else f"Redis {info['redis_version']}"
    client.flushdb()
    result: dict[str, Any] = {"label": label, "server": version, "systems": {}}
    if "rtq" not in args.only:  # else measured by bench_rtq, in alternation with rtq's samples
        say(f"[{label}] {version}: raw PING and SET+GET")
        result["raw"] = bench_raw(url, args.sizes, args)
    systems: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "rtq" in args.only:
        systems.append(("rtq", lambda: bench_rtq(url, procs, logs / label, args)))
    for peer in PEERS:
        if peer not in args.only and not (peer.startswith("rq") and "rq" in args.only):
            continue
        if peer.startswith("rq"):
            systems.append((peer, lambda peer=peer: bench_rq(url, peer, procs, logs / label, args)))  # type: ignore[misc]
        elif peer == "celery":
            systems.append((peer, lambda: bench_celery(url, procs, logs / label, args)))
        else:
            systems.append((peer, lambda: bench_arq(url, procs, logs / label, args)))
    for name, run in systems:
        missing = available(name) if name != "rtq" else None
        if missing:
            say(f"[{label}] {name}: skipped, {missing}")
            result["systems"][name] = {"skipped": missing}
            continue
        say(f"[{label}] {name} ...")
        start = time.perf_counter()
        try:
            with time_limit(args.system_timeout, name):
                result["systems"][name] = run()
            if "floor" in result["systems"][name]:
                result["raw"] = result["systems"][name].pop("floor")
        except Exception as exc:  # one broken peer must not cost the whole run
            say(f"[{label}] {name} failed: {type(exc).__name__}: {exc}")
            result["systems"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"[{label}] {name} done in {time.perf_counter() - start:.0f}s")
        client.flushdb()
    if "rtq" in args.only:
        say(f"[{label}] rtq: data travels once (first and second send of big arrays) ...")
        try:
            sizes = (256 * MiB,) if args.quick else (256 * MiB, 1024 * MiB)  # 1 GiB rows only in a full run
            samples = {256 * MiB: 3 if args.quick else 5, 1024 * MiB: 3}
            result["digests"] = digests_bench.measure(url, sizes=sizes, samples=samples)
        except Exception as exc:
            say(f"[{label}] data travels once failed: {type(exc).__name__}: {exc}")
        client.flushdb()
    if "raw" not in result:  # rtq failed before its floor was measured
        result["raw"] = bench_raw(url, args.sizes, args)
    client.close()
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    rtq = result["systems"].get("rtq", {})
    if "query" not in rtq:
        return {}
    ping = result["raw"]["ping"]["median_ms"]
    rt = max(rtq["query"]["median_ms"], rtq["submit"]["median_ms"])
    p99 = max(rtq["query"]["p99_ms"], rtq["submit"]["p99_ms"])
    peers = [s["throughput"]["tasks_s"] for n, s in result["systems"].items() if n != "rtq" and "throughput" in s]
    echo = [rtq["echo"][k]["mb_s"] / result["raw"]["set_get"][k]["mb_s"] for k in rtq["echo"]]
    out: dict[str, Any] = {
        "rt_ratio": {"value": rt / ping, "limit": 10.0, "ok": rt / ping <= 10.0},
        "rt_p99": {"value": p99, "limit": 5.0, "ok": p99 <= 5.0},
        "echo_ratio": {"value": min(echo), "limit": 0.5, "ok": min(echo) >= 0.5},
    }
    if peers:
        ratio = rtq["throughput"]["tasks_s"] / max(peers)
        out["tp_ratio"] = {"value": ratio, "limit": 2.0, "ok": ratio >= 2.0}
    return {**out, **user_paths.targets(rtq, result["raw"])}


# -- report --------------------------------------------------------------------------------
NAMES = {
    "rq-simple": "RQ (SimpleWorker)",
    "rq-fork": "RQ (default forking Worker)",
    "celery": "Celery (prefork, Redis broker + backend)",
    "arq": "arq (poll delay 0.01 s)",
}


def fmt_size(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size} B"


def render(run: dict[str, Any]) -> str:
    lines = [f"Run {run['date']} on {run['machine']['summary']}.", ""]
    for res in run["servers"]:
        lines += render_server(res)
    return "\n".join(lines).rstrip() + "\n"


def render_server(res: dict[str, Any]) -> list[str]:
    raw, systems = res["raw"], res["systems"]
    echo_key = None
    lines = [f"### {res['server']} ({res['label']})", ""]
    lines += [
        "| system | round trip median | round trip p99 | no-op tasks/s (2 worker processes) | 32 MiB echo |",
        "|---|---|---|---|---|",
    ]
    sizes = sorted(int(k) for k in raw["set_get"])
    echo_key = str(32 * MiB) if str(32 * MiB) in raw["set_get"] else str(sizes[-1])
    lines.append(
        f"| raw redis-py (PING / SET+GET) | {raw['ping']['median_ms']:.3f} ms | {raw['ping']['p99_ms']:.3f} ms | — "
        f"| {raw['set_get'][echo_key]['mb_s']:.0f} MB/s |"
    )
    if "queue" in raw:
        lines.append(
            f"| bare redis-py queue (BLMOVE worker, no payload) | {raw['queue']['median_ms']:.3f} ms "
            f"| {raw['queue']['p99_ms']:.3f} ms | — | — |"
        )
    rtq = systems.get("rtq", {})
    if "query" in rtq:
        for what, key in (("rtq `query()`", "query"), ("rtq `Executor.submit().result()`", "submit")):
            tput = f"{rtq['throughput']['tasks_s']:.0f} (`Executor.map`)" if key == "submit" else "—"
            echo = f"{rtq['echo'][echo_key]['mb_s']:.0f} MB/s" if key == "submit" and echo_key in rtq["echo"] else "—"
            lines.append(f"| {what} | {rtq[key]['median_ms']:.3f} ms | {rtq[key]['p99_ms']:.3f} ms | {tput} | {echo} |")
    elif rtq:
        lines.append(f"| rtq | {rtq.get('error') or rtq.get('skipped')} | | | |")
    for name in PEERS:
        s = systems.get(name)
        if s is None:
            continue
        if "query" not in s:
            lines.append(f"| {NAMES[name]} | {s.get('error') or s.get('skipped')} | | | |")
            continue
        echo = next(iter(s["echo"].values()))
        lines.append(
            f"| {NAMES[name]} | {s['query']['median_ms']:.3f} ms | {s['query']['p99_ms']:.3f} ms "
            f"| {s['throughput']['tasks_s']:.0f} | {echo['mb_s']:.0f} MB/s |"
        )
    if "echo" in rtq:
        lines += [
            "",
            "| payload (numpy uint8) | raw SET+GET | rtq echo (`Executor.submit`) | rtq / raw |",
            "|---|---|---|---|",
        ]
        for key in rtq["echo"]:
            a, b = raw["set_get"][key]["mb_s"], rtq["echo"][key]["mb_s"]
            lines.append(f"| {fmt_size(int(key))} | {a:.0f} MB/s | {b:.0f} MB/s | {b / a:.0%} |")
    if "digests" in res:
        lines += digests_bench.render(res["digests"])
    lines += user_paths.render(rtq)
    if "queue" in raw and "query" in rtq:
        bare, ping = raw["queue"]["median_ms"], raw["ping"]["median_ms"]
        lines += [
            "",
            f"Hops: the bare queue's round trip takes {bare / ping:.1f} PINGs; rtq's `query()` takes "
            f"{rtq['query']['median_ms'] / bare:.1f}x the bare queue, `Executor.submit().result()` "
            f"{rtq['submit']['median_ms'] / bare:.1f}x.",
        ]
    if "concurrent" in rtq:
        c = rtq["concurrent"]
        lines += [
            "",
            f"Concurrency: {c['calls']:,} threads each in one `query()` no-op on one client: "
            f"{c['seconds']:.2f} s for all, {c['failed']} failed, at most {c['peak_connections']} connections open.",
        ]
    if "footprint" in rtq:
        f = rtq["footprint"]
        lines += [
            "",
            f"Footprint: after {f['tasks']:,} no-op calls through `Executor.map`, results consumed, the server "
            f"holds {f['bytes_per_task']:.0f} bytes per task above its starting memory "
            f"({f['before_bytes'] / MB:.1f} → {f['after_bytes'] / MB:.1f} MB, {f['keys_left']} keys left).",
        ]
    if "progress" in rtq:
        p = rtq["progress"]
        lines += [
            "",
            f"Progress: {p['updates']:,} `task.update(i, n)` calls inside a task took {p['update_s']:.3f} s against "
            f"{p['bare_s']:.3f} s for the bare loop: {p['ns_per_update']:.0f} ns per call.",
        ]
    lines += sessions_bench.render(rtq.get("sessions"))
    if res.get("targets"):
        lines += ["", "| target | measured | holds |", "|---|---|---|"]
        t = res["targets"]
        rows = [
            ("median round trip ≤ 10x PING median", "rt_ratio", "{:.1f}x"),
            ("round trip p99 ≤ 5 ms", "rt_p99", "{:.2f} ms"),
            ("throughput ≥ 2x the best peer", "tp_ratio", "{:.1f}x"),
            ("payload echo ≥ 50 % of raw SET+GET (worst size)", "echo_ratio", "{:.0%}"),
        ]
        for label, key, form in rows + user_paths.TARGET_ROWS:
            if key in t:
                lines.append(f"| {label} | {form.format(t[key]['value'])} | {'yes' if t[key]['ok'] else '**no**'} |")
    lines.append("")
    return lines


def machine() -> dict[str, Any]:
    import redis

    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    hiredis = importlib.util.find_spec("hiredis") is not None
    cores = os.cpu_count()
    py = platform.python_version()
    summary = (
        f"{cores} cores ({model}), {platform.system()} {platform.release()}, Python {py}, "
        f"redis-py {redis.__version__}{' + hiredis' if hiredis else ''}"
    )
    return {
        "cores": cores,
        "cpu": model,
        "python": py,
        "redis_py": redis.__version__,
        "hiredis": hiredis,
        "summary": summary,
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a rough run)")
    parser.add_argument("--redis-server", action="store_true", help="also run against the redis-server on PATH")
    parser.add_argument("--url", help="also run against this server (it is flushed!)")
    parser.add_argument("--only", nargs="+", default=["rtq", *PEERS], help="rtq, rq, rq-simple, rq-fork, celery, arq")
    parser.add_argument("--pings", type=int, default=2000, help="raw PINGs for the floor (default 2000)")
    parser.add_argument("--round-trips", type=int, default=500, help="rtq round trips per measure (default 500)")
    parser.add_argument("--tasks", type=int, default=5000, help="rtq no-op tasks for throughput (default 5000)")
    parser.add_argument("--peer-round-trips", type=int, default=200, help="peer round trips (default 200)")
    parser.add_argument("--peer-tasks", type=int, default=1000, help="peer no-op tasks for throughput (default 1000)")
    parser.add_argument("--peer-echo-mib", type=int, default=32, help="peer echo size in MiB (default 32)")
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 32, 256], help="echo sizes (default 1 32 256)")
    parser.add_argument("--footprint-tasks", type=int, default=20_000, help="consumed no-ops for memory (20000)")
    parser.add_argument("--concurrent", type=int, default=1000, help="concurrent query() calls on one client (1000)")
    parser.add_argument("--updates", type=int, default=1_000_000, help="task.update() calls (default 10**6)")
    parser.add_argument("--worker-procs", type=int, default=2, help="worker processes per system (default 2)")
    parser.add_argument("--slots", type=int, default=4, help="task slots per rtq worker process (default 4)")
    parser.add_argument(
        "--system-timeout", type=float, default=600, help="seconds one system may take before it is skipped (600)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json", help="JSON results file")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md", help="Markdown copy of the table")
    args = parser.parse_args(argv)
    args.sizes = [m * MiB for m in args.sizes_mib]
    args.peer_echo = args.peer_echo_mib * MiB
    if args.quick:
        args.round_trips = min(args.round_trips, 200)
        args.tasks = min(args.tasks, 2000)
        args.peer_round_trips = min(args.peer_round_trips, 100)
        args.peer_tasks = min(args.peer_tasks, 300)
    return args


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds``: a hung peer costs one row."""

    def handler(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} took more than {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does: through the ``finally`` that stops every process."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    if {"--cluster", "--sentinel"} & set(sys.argv[1:] if argv is None else argv):
        import bench_scaleout  # Redis Cluster and Sentinel deployments, apart from the peers

        return bench_scaleout.main(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from rtq.server import EmbeddedServer, find_server_binary

    procs = Processes()
    servers: list[EmbeddedServer] = []
    logs = args.out.parent / "logs"
    started = time.perf_counter()
    run: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "argv": sys.argv[1:] if argv is None else argv,
        "servers": [],
    }
    with stop_on_sigterm():
        try:
            targets_to_run: list[tuple[str, str]] = []
            embedded = EmbeddedServer(binary=find_server_binary()).start()
            servers.append(embedded)
            targets_to_run.append(("embedded", embedded.url))
            if args.redis_server:
                binary = shutil.which("redis-server")
                if binary is None:
                    say("--redis-server: no redis-server on PATH; skipped")
                else:
                    system = EmbeddedServer(binary=binary).start()
                    servers.append(system)
                    targets_to_run.append(("redis-server", system.url))
            if args.url:
                targets_to_run.append(("--url", args.url))
            for label, url in targets_to_run:
                run["servers"].append(bench_server(label, url, procs, logs, args))
        except KeyboardInterrupt:
            say("interrupted: stopping every process this run started")
            return 130
        finally:
            procs.stop(grace=5.0)
            for server in servers:
                server.stop()
    run["seconds"] = time.perf_counter() - started
    table = render(run)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    where = args.out.relative_to(HERE.parent) if args.out.is_relative_to(HERE.parent) else args.out
    args.markdown.write_text(
        "# Benchmark results\n\nWritten by `python benchmarks/run.py` (see the README's Benchmarks section); "
        f"the full numbers of this run are in `{where}` (not committed).\n\n" + table
    )
    say(f"took {run['seconds']:.0f}s; wrote {args.out} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
