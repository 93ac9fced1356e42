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
    """Workers, queues and running tasks of ``queue``'s namespace, as plain data.

    A worker record is taken as it is: one written by another version of rtq may lack fields
    (or hold others); the worker's id always comes from the ``workers`` set.
    """
    redis, keys = queue.store.redis, queue.keys
    worker_ids = [text(w) for w in redis.zrange(keys.workers(), 0, -1)]
    records = redis.mget([keys.worker(w) for w in worker_ids]) if worker_ids else []
    workers = [_record(w, r) for w, r in zip(worker_ids, records, strict=True) if r]
    queues: dict[str, int] = {}
    for key in redis.scan_iter(match=keys.queue_pattern(), count=1000):
        queues[keys.queue_name(text(key))] = redis.llen(key)
    running: list[dict[str, Any]] = []
    for worker in workers:
        # The worker's in-progress list is the truth; its record's copy is a heartbeat old.
        worker["running"] = [text(i) for i in redis.lrange(keys.running(worker["id"]), 0, -1)]
        for task_id in worker["running"]:
            name, progress = redis.hmget(keys.task(task_id), ["name", "progress"])
            current, total = _progress(progress)
            running.append(
                {"id": task_id, "queue": text(name), "worker": worker["id"], "current": current, "total": total}
            )
    return {"workers": workers, "queues": queues, "running": running, "dead": redis.llen(keys.dead())}


def _record(worker_id: str, raw: Any) -> dict[str, Any]:
    """A worker's heartbeat record as a dict holding at least its ``id``; unreadable ones say so."""
    try:
        record = json.loads(text(raw))
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"id": worker_id, "unreadable": True}
    return {**record, "id": worker_id}


def _progress(raw: Any) -> tuple[float, float]:
    try:
        current, total, *_ = (text(raw) or "0 100 0").split()
        return float(current), float(total)
    except ValueError:
        return 0.0, 100.0


def format_status(status: dict[str, Any]) -> str:
    """``status`` (from :func:`gather_status`) as text; a field a worker record lacks is left out."""
    now = time.time()
    lines = [f"workers ({len(status['workers'])}):"]
    for w in status["workers"]:
        if w.get("unreadable"):
            lines.append(f"  {w['id']}  (its record is not one this rtq can read)")
            continue
        parts = [f"  {w['id']}"]
        queues = w.get("queues")
        if isinstance(queues, list):
            parts.append(f"queues={','.join(map(str, queues))}")
        if "workers" in w:
            parts.append(f"slots={w['workers']}")
        parts.append(f"running={len(w.get('running', []))}")
        if "done" in w:
            parts.append(f"done={w['done']}")
        if isinstance(w.get("started"), (int, float)):
            parts.append(f"up {now - w['started']:.0f}s")
        if w.get("gpus"):
            parts.append(f"gpus={w['gpus']}")
        lines.append("  ".join(parts))
    lines.append(f"queues ({len(status['queues'])}):")
    for name, length in sorted(status["queues"].items()):
        lines.append(f"  {name}: {length} queued")
    lines.append(f"running tasks ({len(status['running'])}):")
    for t in status["running"]:
        pct = 100 * t["current"] / t["total"] if t["total"] else 0
        lines.append(f"  {t['id']}  {t['queue']}  {t['current']:g}/{t['total']:g} ({pct:.0f}%)  on {t['worker']}")
    lines.append(f"dead letters: {status['dead']}")
    return "\n".join(lines)
