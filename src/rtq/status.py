"""What ``rtq status`` and ``%rtq status`` show: live workers, queue lengths, running tasks.

Redis reads: the workers' set and records, the queues (``SCAN``, ``LLEN``), each live worker's
in-progress list, and, for each task in one, four fields of its record in one pipelined round
trip: its queue, its progress, its label (what it runs: ``train(3)``, ``%%rtq cell In[12]``,
written when it was submitted) and when it was claimed (how long it has run).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .store import text

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["format_status", "gather_status"]

RUNNING_FIELDS = ("name", "progress", "label", "claimed")
"""The record fields read for each running task."""


def gather_status(queue: RedisTaskQueue) -> dict[str, Any]:
    """Workers, queues and running tasks of ``queue``'s namespace, as plain data.

    Each running task is ``{id, queue, label, worker, current, total, reported, started}``:
    ``reported`` is False while the task has reported no progress (``current``/``total`` then
    mean nothing), ``label`` is None for a task submitted without one (a seed task), ``started``
    is None when unknown.
    """
    redis, keys = queue.store.redis, queue.keys
    worker_ids = [text(w) for w in redis.zrange(keys.workers(), 0, -1)]
    records = redis.mget([keys.worker(w) for w in worker_ids]) if worker_ids else []
    workers = [json.loads(text(r)) for r in records if r]
    queues: dict[str, int] = {}
    for key in redis.scan_iter(match=keys.queue_pattern(), count=1000):
        queues[keys.queue_name(text(key))] = redis.llen(key)
    owners: list[tuple[str, str]] = []
    for worker in workers:
        # The worker's in-progress list is the truth; its record's copy is a heartbeat old.
        worker["running"] = [text(i) for i in redis.lrange(keys.running(worker["id"]), 0, -1)]
        owners += [(task_id, worker["id"]) for task_id in worker["running"]]
    pipe = redis.pipeline(transaction=False)
    for task_id, _ in owners:
        pipe.hmget(keys.task(task_id), list(RUNNING_FIELDS))
    running = [
        _running(task_id, worker, fields) for (task_id, worker), fields in zip(owners, pipe.execute(), strict=True)
    ]
    return {"workers": workers, "queues": queues, "running": running, "dead": redis.llen(keys.dead())}


def _running(task_id: str, worker: str, fields: list[Any]) -> dict[str, Any]:
    name, progress, label, claimed = (text(f) if f is not None else None for f in fields)
    try:
        current, total, reported_at = (float(v) for v in (progress or "0 100 0").split())
    except ValueError:
        current, total, reported_at = 0.0, 100.0, 0.0
    try:
        started = float(claimed) if claimed else None
    except ValueError:
        started = None
    return {
        "id": task_id,
        "queue": name,
        "label": label or None,
        "worker": worker,
        "current": current,
        "total": total,
        "reported": reported_at > 0,  # a record starts at "0 100 0": no report written yet
        "started": started,
    }


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
        if not t["reported"]:
            progress = "no progress reported"
        elif t["total"] == t["total"] and t["total"]:  # not NaN (a bar without a total), not 0
            progress = f"{t['current']:g}/{t['total']:g} ({100 * t['current'] / t['total']:.0f}%)"
        else:
            progress = f"{t['current']:g} done (no total)"
        elapsed = _duration(now - t["started"]) if t["started"] else "?"
        lines.append(
            f"  {t['label'] or t['id']}  on {t['queue']}  {progress}  running {elapsed}"
            f"  worker {t['worker']}  task {t['id']}"
        )
    lines.append(f"dead letters: {status['dead']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """``"42s"``, ``"3m 05s"``, ``"2h 01m"``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"
