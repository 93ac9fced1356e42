"""What watchers read: a task's events stream, and the few record fields a display shows.

Each task's progress, output and end go to its stream (``task-events:<id>``, written by
``progress.lua``, ``output.lua`` and ``finish.lua``); :class:`rtq.watch.Follower` reads many
streams with one blocking ``XREAD`` here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .keys import Keys
from .store import TaskStore, text

__all__ = ["Events"]


class Events:
    """Stream and record reads for the watchers of one queue namespace.

    Args:
        store: The namespace's task records.
    """

    def __init__(self, store: TaskStore) -> None:
        self.redis = store.redis
        self.keys: Keys = store.keys

    def read(self, after: dict[str, str], count: int, block_ms: int | None) -> list[tuple[str, list[Any]]]:
        """New entries of the tasks' streams: ``{task_id: last entry id}`` → ``[(task_id, entries)]``.

        Blocks up to ``block_ms`` for the first entry (None: not at all); each entry is
        ``(entry_id, {field: value})``, fields and values as bytes.
        """
        by_key = {self.keys.events(task_id): task_id for task_id in after}
        reply: Any = self.redis.xread(
            {self.keys.events(task_id): last for task_id, last in after.items()}, count=count, block=block_ms
        )
        if isinstance(reply, dict):  # RESP3 or unified replies: {stream: [entries]} or {stream: entries}
            reply = [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
        return [(by_key[text(stream)], entries) for stream, entries in reply or []]

    def states(self, task_ids: Sequence[str]) -> list[str | None]:
        """Each task's state now (None when its record is gone), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.keys.task(task_id), "state")
        return [None if s is None else text(s) for s in pipe.execute()]

    def labels(self, task_ids: Sequence[str]) -> list[str | None]:
        """Each task's label (what it runs, written at submit), None when it has none; one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.keys.task(task_id), "label")
        return [text(s) or None for s in pipe.execute()]

    def progress(self, task_id: str) -> str | None:
        """A task's last ``"current total time"`` progress, or None."""
        raw = self.redis.hget(self.keys.task(task_id), "progress")
        return text(raw) or None

    def error_summary(self, task_id: str) -> dict[str, str]:
        """A failed task's error as plain text (``type``, ``message``), never unpickled; {} when none."""
        raw = self.redis.hget(self.keys.task(task_id), "error_text")
        try:
            info = json.loads(text(raw)) if raw else {}
        except ValueError:
            return {}
        return {k: str(v) for k, v in info.items() if k in ("type", "message")} if isinstance(info, dict) else {}
