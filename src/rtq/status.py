"""What ``rtq status`` and ``%rtq status`` show: live workers, queue lengths, running tasks.

Each worker's line carries what its last beat said about its machine (:mod:`rtq.worker.metrics`):
the host's load, the worker's resident memory, and each GPU's memory, load and temperature, or
"no GPU" when its record has no GPU metrics.

Redis reads: the workers' set and records, the queues (``SCAN``, ``LLEN``), each live worker's
in-progress list, and, for each task in one, four fields of its record in one pipelined round
trip: its queue, its progress, its label (what it runs: ``train(3)``, ``%%rtq cell In[12]``,
written when it was submitted) and when it was claimed (how long it has run); then how many
buffers the namespace holds by digest, in how many keys and bytes (``SCAN``, then ``STRLEN``s);
and the records of the sessions and actors the live workers announce holding (one round trip).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backend.overview import Overview
from .backend.sessions import SessionState
from .backend.store import text
from .serialization import size_text

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["format_status", "gather_status", "gpu_lines", "machine_text", "session_lines", "sessions_of"]

RUNNING_FIELDS = ("name", "progress", "label", "claimed")
"""The record fields read for each running task."""


def gather_status(queue: RedisTaskQueue) -> dict[str, Any]:
    """Workers, queues and running tasks of ``queue``'s namespace, as plain data.

    A worker record is taken as it is: one written by another version of rtq may lack fields
    (or hold others); the worker's id always comes from the ``workers`` set. Each running task
    is ``{id, queue, label, worker, current, total, reported, started}``: ``reported`` is False
    while the task has reported no progress (``current``/``total`` then mean nothing), ``label``
    is None for a task submitted without one (a seed task), ``started`` is None when unknown.
    """
    snapshot = queue.reaper.registry.snapshot(RUNNING_FIELDS)
    workers = [_record(w, raw) for w, raw in snapshot.records.items() if raw]
    running = []
    for worker in workers:
        # The worker's in-progress list is the truth; its record's copy is a heartbeat old.
        worker["running"] = snapshot.claimed.get(worker["id"], [])
        running += [_running(t, worker["id"], snapshot.fields[t]) for t in worker["running"]]
    held = queue.store.blobs.usage()
    sessions = sessions_of(workers, Overview(queue.store).sessions)
    return {
        "workers": workers,
        "queues": snapshot.queues,
        "running": running,
        "dead": snapshot.dead,
        "digests": held,
        "sessions": sessions,
    }


def sessions_of(
    workers: list[dict[str, Any]], read: Callable[[list[str]], dict[str, dict[str, str]]]
) -> list[dict[str, Any]]:
    """The sessions and actors the live ``workers`` announce, with what their records say.

    ``read(ids)`` returns each session's record (text fields). Each is ``{id, kind, label,
    worker, host, gpu, created, used, calls, names, results}``: ``created``/``used`` are Unix
    seconds or None, ``names`` the ``[name, type, bytes]`` it holds, ``results`` the large call
    results it keeps for their callers (``[task id, type, bytes]``). A field of the wrong type
    (a record another program wrote) is left out as unknown.
    """
    announced: list[tuple[str, dict[str, Any]]] = []
    for worker in workers:
        held = worker.get("sessions")
        for entry in held if isinstance(held, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                announced.append((str(worker["id"]), entry))
    records = read([entry["id"] for _, entry in announced]) if announced else {}
    out = []
    for worker_id, entry in announced:
        record = records.get(entry["id"], {})
        state = SessionState(record, True)
        out.append(
            {
                "id": entry["id"],
                "kind": str(record.get("kind") or entry.get("kind") or "?"),
                "label": str(record.get("label") or entry.get("label") or "?"),
                "worker": worker_id,
                "host": record.get("host", ""),
                "gpu": record.get("gpu", ""),
                "created": _seconds(record.get("created")),
                "used": _seconds(record.get("used")),
                "calls": int(record["calls"]) if record.get("calls", "").isdigit() else None,
                "names": [row for row in state.names if _row(row)],
                "results": [row for row in state.results if _row(row)],
            }
        )
    return sorted(out, key=lambda s: (s["worker"], s["created"] or 0))


def session_lines(sessions: list[dict[str, Any]], now: float) -> list[str]:
    """``sessions`` (from :func:`sessions_of`) as text, two or three lines each."""
    lines = []
    for s in sessions:
        parts = [f"  {s['kind']} {s['label']!r}", f"worker {s['worker']}" + (f" on {s['host']}" if s["host"] else "")]
        if s["gpu"]:
            parts.append(f"GPU {s['gpu']}")
        parts.append(f"age {_duration(now - s['created'])}" if s["created"] else "age ?")
        parts.append(f"idle {_duration(now - s['used'])}" if s["used"] else "idle ?")
        if s["calls"] is not None:
            parts.append(f"calls {s['calls']}")
        lines.append("  ".join(parts))
        held = ", ".join(f"{name} ({kind}, {size_text(int(size))})" for name, kind, size in s["names"])
        lines.append(f"    holds: {held or 'nothing'}")
        if s["results"]:
            total = sum(int(size) for _, _, size in s["results"])
            lines.append(f"    results kept until asked for: {len(s['results'])} ({size_text(total)})")
    return lines


def _row(row: list[Any]) -> bool:
    return isinstance(row[0], str) and isinstance(row[1], str) and _number(row[2])


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _record(worker_id: str, raw: Any) -> dict[str, Any]:
    """A worker's heartbeat record as a dict holding at least its ``id``; unreadable ones say so."""
    try:
        record = json.loads(text(raw))
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"id": worker_id, "unreadable": True}
    return {**record, "id": worker_id}


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
        parts.append(machine_text(w))
        lines.append("  ".join(p for p in parts if p))
        lines += [f"    {line}" for line in gpu_lines(w)]
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
    sessions = status.get("sessions", [])
    lines.append(f"sessions and actors ({len(sessions)}):")
    lines += session_lines(sessions, now)
    lines.append(f"dead letters: {status['dead']}")
    held = status.get("digests")
    if held:
        lines.append(
            f"buffers by digest: {held['buffers']} ({size_text(held['bytes'])} in {held['keys']} "
            f"key{'' if held['keys'] == 1 else 's'})"
        )
    return "\n".join(lines)


def machine_text(worker: dict[str, Any]) -> str:
    """``"load 0.52 (2 cpus)  rss 85.3 MiB  no GPU"``: what a record says of its machine, as far as it says."""
    parts = []
    load, cpus = worker.get("load"), worker.get("cpus")
    if _number(load):
        parts.append(f"load {load:.2f}" + (f" ({cpus} cpus)" if isinstance(cpus, int) else ""))
    if _number(worker.get("rss")):
        parts.append(f"rss {size_text(int(worker['rss']))}")
    if not _gpus(worker):
        visible = worker.get("gpus")
        if isinstance(visible, list) and visible:  # listed by nvidia-smi, but no NVML to read them
            parts.append(f"gpus={','.join(map(str, visible))} (no metrics without NVML: pip install 'rtq[gpu]')")
        else:
            parts.append("no GPU")
    return "  ".join(parts)


def gpu_lines(worker: dict[str, Any]) -> list[str]:
    """One line per GPU in a record's ``gpu_metrics``: ``GPU 0 NVIDIA H200  12.0/80.0 GiB  45% busy  61°C``."""
    lines = []
    for gpu in _gpus(worker):
        parts = [f"GPU {gpu.get('index', '?')} {gpu.get('name', '')}".rstrip()]
        if _number(gpu.get("memory_used")) and _number(gpu.get("memory_total")):
            parts.append(f"{size_text(int(gpu['memory_used']))} of {size_text(int(gpu['memory_total']))} memory")
        if _number(gpu.get("utilization")):
            parts.append(f"{gpu['utilization']:.0f}% busy")
        if _number(gpu.get("temperature")):
            parts.append(f"{gpu['temperature']:.0f}°C")
        lines.append("  ".join(parts))
    return lines


def _gpus(worker: dict[str, Any]) -> list[dict[str, Any]]:
    metrics = worker.get("gpu_metrics")
    return [g for g in metrics if isinstance(g, dict)] if isinstance(metrics, list) else []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _duration(seconds: float) -> str:
    """``"42s"``, ``"3m 05s"``, ``"2h 01m"``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"
