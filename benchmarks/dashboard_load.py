"""What ``rtq dashboard`` costs with 20 workers and 200 running tasks: its CPU and its Redis commands.

The namespace is made to look as 20 busy workers make it look — their heartbeat records (with
a GPU each), their in-progress lists, 200 running task records — and a feeder refreshes it at a
worker's pace: every second each worker's record and lease, and for each task a progress entry
and a line of output on its events stream (what ``progress.lua`` and ``output.lua`` write), so
the page changes every refresh. (Twenty real worker processes would not fit the machine the
dashboard is measured on; the dashboard reads the same keys either way.)

Then a real ``rtq dashboard`` process runs on it (``--refresh 1``, the default), first with no
page open, then with one event-stream reader connected (as a browser's page is). Measured over
each window: the dashboard's CPU time (``/proc/<pid>/stat``: user + system) per wall second,
and the commands its connections sent (``tot-cmds`` of ``CLIENT LIST``, Redis 7.2+/Valkey; the
feeder's connections are named ``bench-…`` and left out); and the events and bytes pushed.

Usage: ``python benchmarks/dashboard_load.py [--url redis://...] [--seconds 20] [--json]``
(without ``--url`` it starts an embedded server).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from rtq.backend.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "dashbench"
QUEUES = ("gpu", "cpu")


def _populate(r: redis.Redis, keys: Keys, workers: int, tasks: int) -> dict[str, list[str]]:
    """Worker records, in-progress lists and running task records; returns each worker's task ids."""
    now = time.time()
    held: dict[str, list[str]] = {f"gpu-box-{w:02d}:{1000 + w}:bench": [] for w in range(workers)}
    pipe = r.pipeline(transaction=False)
    for i in range(tasks):
        worker = list(held)[i % workers]
        task_id = f"task{i:04d}"
        held[worker].append(task_id)
        pipe.hset(
            keys.task(task_id),
            mapping={
                "name": QUEUES[i % 2],
                "label": f"train(fold={i})",
                "state": "running",
                "owner": worker,
                "attempt": "1",
                "claimed": repr(now),
                "progress": "0.0 1000.0 0.0",
                "submitted": repr(now - 5),
            },
        )
        pipe.rpush(keys.running(worker), task_id)
    pipe.execute()
    return held


def _feed(r: redis.Redis, keys: Keys, held: dict[str, list[str]], stop: threading.Event) -> None:
    """Once a second, what busy workers write: records and leases, progress and output."""
    step = 0
    while not stop.wait(1.0):  # a worker's pace, not a synchronisation
        step += 1
        now = time.time()
        pipe = r.pipeline(transaction=False)
        for n, (worker, ids) in enumerate(held.items()):
            record = {
                "id": worker,
                "host": worker.split(":")[0],
                "pid": 1000 + n,
                "queues": list(QUEUES),
                "workers": len(ids),
                "started": now - 3600,
                "beat": now,
                "running": ids,
                "done": step,
                "stopping": False,
                "load": 3.5,
                "cpus": 32,
                "rss": 2 << 30,
                "gpus": ["0"],
                "gpu_metrics": [
                    {
                        "index": 0,
                        "name": "NVIDIA H200",
                        "memory_used": (60 + step % 20) << 30,
                        "memory_total": 141 << 30,
                        "utilization": 90,
                        "temperature": 66,
                    }
                ],
            }
            pipe.set(keys.worker(worker), json.dumps(record), px=10_000)
            pipe.zadd(keys.workers(), {worker: now + 10})
            for task_id in ids:
                progress = f"{float(step)!r} 1000.0 {now!r}"
                pipe.hset(keys.task(task_id), "progress", progress)
                pipe.xadd(keys.events(task_id), {"progress": progress}, maxlen=1000, approximate=True)
                pipe.xadd(keys.events(task_id), {"stdout": f"epoch {step}: loss {1 / step:.4f}\n"}, maxlen=1000)
        pipe.execute()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _dashboard_commands(r: redis.Redis) -> int:
    total = 0
    for client in r.client_list():
        if not str(client.get("name", "")).startswith("bench-"):
            total += int(client.get("tot-cmds", 0))
    return total


class _Reader(threading.Thread):
    """An event-stream reader, as a browser's page is: counts events and bytes."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events = 0
        self.bytes = 0
        self.reply: Any = None

    def run(self) -> None:
        self.reply = urllib.request.urlopen(self.url, timeout=30)
        while True:
            chunk = self.reply.read1(1 << 16)
            if not chunk:
                return
            self.bytes += len(chunk)
            self.events += chunk.count(b"\ndata: ") + chunk.startswith(b"data: ")


def _window(r: redis.Redis, pid: int, seconds: float, reader: _Reader | None) -> dict[str, float]:
    cpu0, cmds0, t0 = _cpu_seconds(pid), _dashboard_commands(r), time.monotonic()
    events0, bytes0 = (reader.events, reader.bytes) if reader else (0, 0)
    time.sleep(seconds)  # the measuring window
    wall = time.monotonic() - t0
    out = {
        "seconds": wall,
        "cpu_percent_of_one_core": 100 * (_cpu_seconds(pid) - cpu0) / wall,
        "redis_commands_s": (_dashboard_commands(r) - cmds0) / wall,
    }
    if reader:
        out["events_s"] = (reader.events - events0) / wall
        out["kib_pushed_s"] = (reader.bytes - bytes0) / wall / 1024
    return out


def measure(url: str, *, workers: int = 20, tasks: int = 200, seconds: float = 20.0) -> dict[str, Any]:
    """Run the dashboard on a busy namespace; its cost with no page open and with one."""
    r = redis.Redis.from_url(url, client_name="bench-feeder")
    keys = Keys(PREFIX, "task-queue")
    for key in r.scan_iter(match=f"{PREFIX}|*", count=1000):
        r.delete(key)
    held = _populate(r, keys, workers, tasks)
    stop = threading.Event()
    writer = redis.Redis.from_url(url, client_name="bench-feed")
    feeder = threading.Thread(target=_feed, args=(writer, keys, held, stop))
    feeder.start()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtq", "dashboard", "--url", url, "--prefix", PREFIX, "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        found = re.search(r"(http://\S+/\?token=\S+)", proc.stdout.readline())
        assert found, "the dashboard printed no URL"
        base, token = found.group(1).split("/?token=")
        idle = _window(r, proc.pid, seconds / 2, None)
        reader = _Reader(f"{base}/events?token={token}")
        reader.start()
        deadline = time.monotonic() + 30
        while reader.events < 2 and time.monotonic() < deadline:  # warmed up: every task seen once
            time.sleep(0.05)
        watched = _window(r, proc.pid, seconds, reader)
        with urllib.request.urlopen(f"{base}/api/state?token={token}", timeout=30) as reply:
            state = json.loads(reply.read())
        assert len(state["workers"]) == workers and len(state["running"]) == tasks, "the page misses some"
        return {"workers": workers, "running_tasks": tasks, "no_page": idle, "one_page": watched}
    finally:
        stop.set()
        feeder.join()
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        for key in r.scan_iter(match=f"{PREFIX}|*", count=1000):
            r.delete(key)
        r.close()
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis URL (default: an embedded server)")
    parser.add_argument("--seconds", type=float, default=20.0, help="the window with a page open (default 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.url:
        result = measure(args.url, seconds=args.seconds)
    else:
        from rtq.server import EmbeddedServer

        with EmbeddedServer() as server:
            result = measure(server.url, seconds=args.seconds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"rtq dashboard, {result['workers']} workers, {result['running_tasks']} running tasks, --refresh 1:")
    for name in ("no_page", "one_page"):
        w = result[name]
        extra = f", {w['events_s']:.2f} events/s, {w['kib_pushed_s']:.1f} KiB/s pushed" if "events_s" in w else ""
        print(
            f"  {name.replace('_', ' ')}: {w['cpu_percent_of_one_core']:.2f}% of one core, "
            f"{w['redis_commands_s']:.1f} Redis commands/s{extra} (over {w['seconds']:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
