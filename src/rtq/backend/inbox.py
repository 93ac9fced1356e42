"""The Redis half of the client's wait path (:mod:`rtq.collector`): wake-ups, ends, clean-ups.

A caller's tasks announce their end on its inbox list (``inbox:<client>``, or a task's own
``task-done:<id>``). What settles a waiter is never the push itself but the task's record,
read here into an :class:`End`; the decisions (who is settled, when a task counts as lost) are
the collector's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis as redis_py

from ..task import TaskState
from .keys import Keys
from .store import OUTCOME_FIELDS, TaskStore, text
from .wire import Channel

__all__ = ["COLLECT_BATCH", "End", "Inbox"]

COLLECT_BATCH = 1000
"""Most ended ids taken from an inbox per round trip."""
_READ = (*OUTCOME_FIELDS, "progress", "attempt", "params#", "owner")
"""What settles a waiter: the outcome, progress, attempts, the params' frame list, the owner."""
_N = len(OUTCOME_FIELDS)


@dataclass
class End:
    """What a task's record says about how it ended (or that it has not).

    Attributes:
        state: The record's state; '' when the record is gone.
        value: The result when done, the exception when failed.
        error: Why the outcome could not be read (``TaskLost`` when the record is gone, a
            ``SignatureError``/``SerializationError`` for a forged or unreadable one), else None.
        attempts: How many workers claimed it.
        progress: The last ``"current total time"`` progress, or None.
        owner: The worker that claimed it last ('' when none).
        frames: The keys of its big frames (removed with it when consumed).
    """

    state: str
    value: Any = None
    error: BaseException | None = None
    attempts: int = 0
    progress: str | None = None
    owner: str = ""
    frames: list[str] = field(default_factory=list)


class Inbox:
    """Wake-ups and record reads for the waiters of one queue namespace.

    Args:
        store: The namespace's task records.
    """

    def __init__(self, store: TaskStore, events_keep_s: float = 10.0) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.events_keep_s = events_keep_s

    def wake(
        self,
        channel: Channel,
        inbox: str,
        lists: Sequence[str],
        block: float,
        sole: str | None,
        consumed: Sequence[tuple[str, End]] = (),
    ) -> tuple[list[str], Any]:
        """Block up to ``block`` seconds on ``inbox`` (and ``lists``); the ids that ended.

        One round trip: the pop of every id already waiting runs right after the blocking
        one, and with ``sole`` (the one task awaited) its record is read after both, so it is
        final if ``sole`` is among the ids. The clean-up of ``consumed`` tasks (see
        :meth:`consume`) goes first, in the same write. Returns the ids and that read (pass it
        to :meth:`ends`).
        """
        cleanups = self._consume_commands(consumed)
        commands: list[tuple[Any, ...]] = [
            *cleanups,
            ("BLPOP", inbox, *lists, max(0.01, block)),
            ("LPOP", inbox, COLLECT_BATCH),
        ]
        if sole is not None:
            commands.append(("HMGET", self.keys.task(sole), *_READ))
        replies = channel.pipeline(commands)
        done, (item, more, *ahead) = replies[: len(cleanups)], replies[len(cleanups) :]
        if any(isinstance(r, redis_py.exceptions.NoScriptError) for r in done):  # a restarted server
            self.consume(channel, consumed)  # loads the script, then runs them all again (idempotent)
        for reply in (item, more, *ahead):
            if isinstance(reply, Exception):
                raise reply
        ids = [text(i) for i in ([item[1]] if item else []) + (more or [])]
        return ids, (ahead[0] if sole is not None and sole in ids else None)

    def ends(self, channel: Channel, task_ids: Sequence[str], read: dict[str, Any] | None = None) -> list[End]:
        """Each task's :class:`End` from its record (one round trip for those not in ``read``)."""
        read = read or {}
        unread = [("HMGET", self.keys.task(i), *_READ) for i in task_ids if i not in read]
        fetched = iter(channel.pipeline(unread) if unread else [])
        return [self._end(i, read[i] if i in read else next(fetched)) for i in task_ids]

    def _end(self, task_id: str, values: Any) -> End:
        if isinstance(values, Exception):
            raise values
        progress, attempts, params_list, owner = values[_N:]
        lists = [params_list, values[OUTCOME_FIELDS.index("result#")], values[OUTCOME_FIELDS.index("error#")]]
        end = End(
            text(values[0]),
            attempts=_attempts(attempts),
            progress=text(progress) or None,
            owner=text(owner),
            frames=self.store.frame_keys(self.keys.task(task_id), lists),
        )
        if end.state and end.state not in (TaskState.DONE, TaskState.FAILED):
            return end  # not ended, or cancelled: nothing to decode
        try:
            end.state, end.value = self.store.outcome(task_id, values[:_N])  # TaskLost when it vanished
        except redis_py.ConnectionError:
            raise
        except Exception as exc:  # unreadable or gone: that is how the wait ends
            end.error = exc
        return end

    def consume(self, channel: Channel, ended: Sequence[tuple[str, End]], events_keep_s: float | None = None) -> None:
        """Remove what consumed tasks left (record, done list, frames; events unless worth keeping).

        Their events stay readable ``events_keep_s`` seconds (by default :attr:`events_keep_s`).
        """
        commands = self._consume_commands(ended, events_keep_s)
        if not commands:
            return
        script = self.store.scripts["consume"]
        replies = channel.pipeline(commands)
        if any(isinstance(r, redis_py.exceptions.NoScriptError) for r in replies):  # a restarted server
            channel.load(script)
            channel.pipeline(commands)

    def _consume_commands(
        self, ended: Sequence[tuple[str, End]], events_keep_s: float | None = None
    ) -> list[tuple[Any, ...]]:
        script = self.store.scripts["consume"]
        keep = int((self.events_keep_s if events_keep_s is None else events_keep_s) * 1000)
        commands: list[tuple[Any, ...]] = []
        for task_id, end in ended:
            keys = [self.keys.task(task_id), self.keys.events(task_id), self.keys.done(task_id), *end.frames]
            commands.append(("EVALSHA", script.sha, len(keys), *keys, keep))
        return commands

    def lapsed(self, channel: Channel, owners: Sequence[str]) -> set[str]:
        """Which of these workers' leases ended."""
        if not owners:
            return set()
        alive = channel.pipeline([("EXISTS", self.keys.worker(o)) for o in owners])
        return {o for o, a in zip(owners, alive, strict=True) if not isinstance(a, Exception) and not a}

    def nowhere(self, channel: Channel, tasks: Sequence[tuple[str, str]], expected: str) -> list[bool]:
        """For each ``(task_id, queue)``: whether its record says ``expected`` while its id is in no list.

        One atomic snapshot (MULTI/EXEC) of each record's state, its queue and every known
        worker's in-progress and landing lists, so an id moving between lists is never missed.
        """
        if not tasks:
            return []
        keys = self.keys
        workers = [text(w) for w in channel.execute("ZRANGE", keys.workers(), 0, -1)]
        lists = [keys.running(w) for w in workers]
        if workers:  # and the lists their claim threads land ids in, for the instant before a claim
            for landings in channel.pipeline([("SMEMBERS", keys.landings(w)) for w in workers]):
                if isinstance(landings, Exception):
                    raise landings
                lists += sorted(text(k) for k in landings)
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        for task_id, queue in tasks:
            commands.append(("HGET", keys.task(task_id), "state"))
            commands.append(("LPOS", keys.queue(queue), task_id))
            commands += [("LPOS", key, task_id) for key in lists]
        commands.append(("EXEC",))
        snapshot = channel.pipeline(commands)[-1]
        if isinstance(snapshot, Exception):
            raise snapshot
        per = 2 + len(lists)
        out = []
        for i in range(len(tasks)):
            state, *places = snapshot[i * per : (i + 1) * per]
            out.append(text(state) == expected and all(p is None for p in places))
        return out


def _attempts(raw: Any) -> int:
    try:
        return int(text(raw) or 0)
    except ValueError:
        return 1
