"""The dashboard's picture of one queue namespace, refreshed from Redis and sent to the page as JSON.

:meth:`Board.refresh` reads the namespace's layout (:class:`rtq.backend.overview.Overview`) and
the new events of every running task (one non-blocking ``XREAD`` of all their streams), and
keeps, per running task, its label, progress and the last lines it printed. A task is read in
full once, when it is first seen running. :meth:`Board.state` is what the page renders: plain
data, safe to show — labels, progress, output text, error lines, timestamps and machine
metrics, never a payload, a password or a secret (worker records are read field by known field).

The sessions and actors the live workers hold (:func:`rtq.status.sessions_of`: worker, host,
kind, age, idle time, the names held with their types and sizes) are read from their records
each refresh, one round trip. A new panel is a key of :meth:`Board.state` and an entry of the
page's ``PANELS``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backend.events import Events
from ..backend.overview import Layout, Overview
from ..backend.store import text
from ..status import sessions_of

if TYPE_CHECKING:
    from ..task_queue import RedisTaskQueue

__all__ = ["Board"]

LINES_KEPT = 5
"""Output lines shown per running task."""
LINE_WIDTH = 300
"""Characters kept of one output line."""
RECENT_EVENTS = 50
"""Events read back from a task's stream when it is first seen (its recent output)."""
SCAN_EVERY = 10
"""Refreshes between two looks for new queue names (a keyspace ``SCAN``)."""
LISTED = 50
"""Failures and dead letters shown."""
_TASK_FIELDS = ("name", "label", "claimed", "progress")
# The record fields the page shows, and their types: anything else a record holds stays out.
_WORKER_FIELDS: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "pid": (int,),
    "workers": (int,),
    "started": (int, float),
    "beat": (int, float),
    "stopping": (bool,),
    "load": (int, float),
    "cpus": (int,),
    "rss": (int,),
}
_GPU_FIELDS: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "name": (str,),
    "memory_used": (int,),
    "memory_total": (int,),
    "utilization": (int, float),
    "temperature": (int, float),
}

_ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "queue": (str,),
    "label": (str,),
    "error": (str,),
    "worker": (str,),
    "time": (int, float),
}


@dataclass
class _Running:
    """What the page shows of one running task."""

    queue: str
    label: str | None
    worker: str
    started: float | None
    current: float = 0.0
    total: float = 100.0
    reported: bool = False
    last: str = "0-0"  # the last stream entry read
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LINES_KEPT))
    partial: str = ""  # an unfinished last line

    def progress(self, value: Any) -> None:
        try:
            current, total, at = (float(v) for v in text(value).split())
        except ValueError:
            return
        self.current, self.total, self.reported = current, total, at > 0 or self.reported

    def output(self, chunk: str) -> None:
        """Add printed text; a carriage return (a text progress bar) rewrites the current line."""
        *done, self.partial = (self.partial + chunk).split("\n")
        for line in done:
            self.lines.append(_visible(line))

    def tail(self) -> list[str]:
        shown = list(self.lines)
        if _visible(self.partial).strip():
            shown = [*shown, _visible(self.partial)][-LINES_KEPT:]
        return shown


def _visible(line: str) -> str:
    return line.rsplit("\r", 1)[-1][:LINE_WIDTH]


class Board:
    """The dashboard's state of one queue namespace.

    Args:
        queue: The namespace (its store is read; nothing is written).
        where: How the page names the server (never with its password); default: host:port/db.
    """

    def __init__(self, queue: RedisTaskQueue, where: str | None = None) -> None:
        self.overview = Overview(queue.store)
        self.events = Events(queue.store)
        self.prefix = queue.prefix
        self.where = where or self.overview.where()
        self.running: dict[str, _Running] = {}
        self.queue_names: set[str] = set()
        self.refreshes = 0
        self.layout: Layout | None = None
        self.sessions: list[dict[str, Any]] = []

    def refresh(self) -> None:
        """Read what changed since the last refresh (a handful of round trips)."""
        if self.refreshes % SCAN_EVERY == 0:
            self.queue_names = set(self.overview.queue_names())
        self.refreshes += 1
        layout = self.overview.layout(sorted(self.queue_names), LISTED)
        served = {q for raw in layout.records.values() for q in _clean(_record(raw)).get("queues", [])}
        if served - set(layout.queues):  # a new worker's queues: shown from this refresh on
            layout.queues.update(self.overview.queues(sorted(served - set(layout.queues))))
        # The next refresh reads the queues that hold tasks and those live workers serve.
        self.queue_names = {name for name, (length, _) in layout.queues.items() if length} | served
        claimed = {task: worker for worker, ids in layout.claimed.items() for task in ids}
        for gone in set(self.running) - set(claimed):
            del self.running[gone]
        new = [t for t in claimed if t not in self.running]
        known = {t: r.last for t, r in self.running.items()}
        if new:
            for task_id, fields, recent in zip(
                new, self.overview.tasks(new, _TASK_FIELDS), self.overview.recent(new, RECENT_EVENTS), strict=True
            ):
                name, label, claimed_at, progress = (None if f is None else text(f) for f in fields)
                run = _Running(name or "?", label or None, claimed[task_id], _seconds(claimed_at))
                run.progress(progress or "")
                self._apply(run, recent, progress_too=False)
                self.running[task_id] = run
        if known:
            for task_id, entries in self.events.read(known, 1000, None):
                self._apply(self.running[task_id], entries)
        live = [{**_record(raw), "id": worker_id} for worker_id, raw in layout.records.items() if raw]
        self.sessions = sessions_of(live, self.overview.sessions)
        self.layout = layout

    @staticmethod
    def _apply(run: _Running, entries: list[Any], *, progress_too: bool = True) -> None:
        for entry_id, fields in entries:
            run.last = text(entry_id)
            for kind, value in fields.items():
                kind = text(kind)
                if kind in ("stdout", "stderr"):
                    run.output(text(value))
                elif kind == "progress" and progress_too:
                    run.progress(value)

    def state(self) -> dict[str, Any]:
        """What the page shows now (call :meth:`refresh` first), as JSON-ready data."""
        layout = self.layout
        if layout is None:
            return {"where": self.where, "prefix": self.prefix}
        workers = []
        for worker_id, raw in layout.records.items():
            if not raw:
                continue
            shown = _clean(_record(raw))
            shown["id"] = worker_id
            shown["busy"] = len(layout.claimed.get(worker_id, []))
            shown["lease_ends"] = layout.leases.get(worker_id)
            workers.append(shown)
        running = [
            {
                "id": task_id,
                "label": run.label,
                "queue": run.queue,
                "worker": run.worker,
                "started": run.started,
                "current": run.current,
                "total": run.total,
                "reported": run.reported,
                "lines": run.tail(),
            }
            for task_id, run in sorted(self.running.items(), key=lambda item: item[1].started or 0)
        ]
        queues = [
            {"name": name, "length": length, "oldest": oldest}
            for name, (length, oldest) in sorted(layout.queues.items())
        ]
        return {
            "where": self.where,
            "prefix": self.prefix,
            "workers": sorted(workers, key=lambda w: (str(w.get("host")), w["id"])),
            "queues": queues,
            "running": running,
            "sessions": self.sessions,
            "failures": [_entry(e) for e in layout.failures],
            "dead": {"count": layout.dead_count, "entries": [_entry(e) for e in layout.dead]},
        }

    def error(self, task_id: str) -> dict[str, str]:
        """A failed task's error line and traceback: the failures list's copy, else its record's ({} when gone)."""
        for entry in self.layout.failures if self.layout else []:
            if entry.get("id") == task_id and isinstance(entry.get("traceback"), str):
                return {"error": str(entry.get("error", "")), "traceback": entry["traceback"]}
        return self.overview.error(task_id)


def _record(raw: Any) -> dict[str, Any]:
    try:
        record = json.loads(text(raw)) if raw else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _typed(values: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The ``fields`` of ``values`` that have their type (True is no number here)."""
    return {
        k: values[k]
        for k, types in fields.items()
        if isinstance(values.get(k), types) and (bool in types or not isinstance(values[k], bool))
    }


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """A worker record's fields the page shows, each of its expected type."""
    shown = _typed(record, _WORKER_FIELDS)
    for name in ("queues", "gpus"):
        if isinstance(record.get(name), list):
            shown[name] = [str(v) for v in record[name] if isinstance(v, (str, int))]
    metrics = record.get("gpu_metrics")
    if isinstance(metrics, list):
        shown["gpu_metrics"] = [_typed(g, _GPU_FIELDS) for g in metrics if isinstance(g, dict)]
    return shown


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A failures or dead-letter list entry's fields the page shows."""
    return _typed(entry, _ENTRY_FIELDS)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
