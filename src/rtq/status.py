"""What ``rtq status`` shows: live workers, queue lengths, running tasks with progress."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .backend.store import text

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["format_status", "gather_status"]


def gather_status(queue: RedisTaskQueue) -> dict[str, Any]:
    """Workers, queues and running tasks of ``queue``'s namespace, as plain data."""
    redis, keys = queue.store.redis, queue.keys
    worker_ids = [text(w) for w in redis.zrange(keys.workers(), 0, -1)]
    records = redis.mget([keys.worker(w) for w in worker_ids]) if worker_ids else []
    workers = [json.loads(text(r)) for r in records if r]
    queues: dict[str, int] = {}
    for key in redis.scan_iter(match=keys.queue_pattern(), count=1000):
        queues[keys.queue_name(text(key))] = redis.llen(key)
    running: list[dict[str, Any]] = []
    for worker in workers:
        # The worker's in-progress list is the truth; its record's copy is a heartbeat old.
        worker["running"] = [text(i) for i in redis.lrange(keys.running(worker["id"]), 0, -1)]
        for task_id in worker["running"]:
            name, progress = redis.hmget(keys.task(task_id), ["name", "progress"])
            current, total, _ = (text(progress) or "0 100 0").split()
            running.append(
                {
                    "id": task_id,
                    "queue": text(name),
                    "worker": worker["id"],
                    "current": float(current),
                    "total": float(total),
                }
            )
    return {"workers": workers, "queues": queues, "running": running, "dead": redis.llen(keys.dead())}


def format_status(status: dict[str, Any]) -> str:
    now = time.time()
    lines = [f"workers ({len(status['workers'])}):"]
    for w in status["workers"]:
        gpus = f" gpus={w['gpus']}" if w.get("gpus") else ""
        lines.append(
            f"  {w['id']}  queues={','.join(w['queues'])}  slots={w['workers']}  running={len(w.get('running', []))}"
            f"  done={w.get('done', 0)}  up {now - w['started']:.0f}s{gpus}"
        )
    lines.append(f"queues ({len(status['queues'])}):")
    for name, length in sorted(status["queues"].items()):
        lines.append(f"  {name}: {length} queued")
    lines.append(f"running tasks ({len(status['running'])}):")
    for t in status["running"]:
        pct = 100 * t["current"] / t["total"] if t["total"] else 0
        lines.append(f"  {t['id']}  {t['queue']}  {t['current']:g}/{t['total']:g} ({pct:.0f}%)  on {t['worker']}")
    lines.append(f"dead letters: {status['dead']}")
    return "\n".join(lines)
