"""A worker's writes to the tasks it holds, fenced by its claim: the Redis half of the worker.

Every write names the claim it was made under (the worker, the attempt, the submission token);
the scripts refuse a write whose claim no longer holds, so a worker that was taken over, or a
run of an earlier submission of the same id, can never overwrite a newer run's record.

``finish``: a small outcome goes through ``finish.lua`` alone, batched with the outcomes of
tasks ending together (:class:`~rtq.backend.batching.GroupCommit`); one with extra frames (hash
fields, or keys of their own when big) is written with ``finish.lua`` in one MULTI/EXEC
transaction, in the same write: Redis stores all of it or none of it, so a part refused for lack
of memory never leaves a task done with half a result, and a worker killed while sending a big
result leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import redis as redis_py

from ..serialization import size_text
from .batching import GroupCommit
from .keys import Keys
from .store import KEEP_S, Encoded, TaskStore, flatten
from .wire import Channel, raise_errors

__all__ = ["Claims", "Held"]


@dataclass(frozen=True)
class Held:
    """One claim a worker holds: which task, under which attempt and submission, announced where."""

    task_id: str
    name: str
    attempt: int
    token: str
    notify: str
    expiry: float


class Claims:
    """The fenced writes of one worker.

    Args:
        store: The namespace's task records.
        worker_id: The worker whose claims fence the writes.
    """

    def __init__(self, store: TaskStore, worker_id: str) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.worker_id = worker_id
        self.running_key = store.keys.running(worker_id)
        self.finisher = GroupCommit(store.redis)  # finish.lua calls of tasks ending together
        # Test hook: send an outcome with big frames only up to its first frame, write the task
        # id to this file, and hold the rest back until "<file>.go" exists (a test kills or
        # stops the worker there).
        self.pause_in_outcome = os.environ.get("RTQ_TEST_PAUSE_IN_OUTCOME")

    def finish(self, held: Held, state: str, enc: Encoded, *, dead_entry: str = "", what: str = "") -> bool:
        """Store an outcome ``enc`` (``state`` ``done`` or ``failed``); True when stored, False when fenced out.

        Args:
            held: The claim it is stored under.
            state: ``'done'`` or ``'failed'``.
            enc: The encoded result or exception (:meth:`TaskStore.encode`).
            dead_entry: A dead-letter entry (JSON) added in the same step, or ''.
            what: What the outcome is, for the error when Redis refuses it.

        Raises:
            RedisFull: Redis refused it for lack of memory (none of it was written).
            redis.ConnectionError: Redis is away (the caller retries).
        """
        keys_, task_id = self.keys, held.task_id
        key = keys_.task(task_id)
        finish = self.store.scripts["finish"]
        first, rest = _split_frames(enc.fields, ("result", "error", "error_text"))
        keys = [key, self.running_key, held.notify, keys_.events(task_id), keys_.dead(), *enc.frames]
        args = [
            task_id,
            self.worker_id,
            str(held.attempt),
            state,
            repr(time.time()),
            int(KEEP_S * 1000),
            held.token,  # fences out a run of an earlier submission of this id
            dead_entry,
            *flatten(first),
        ]
        if not rest and not enc.frames:
            # Tasks ending together share one round trip (a lone one is sent at once).
            try:
                return bool(self.finisher.call(finish, keys=keys, args=args))
            except redis_py.ResponseError as exc:
                raise_errors([exc], what)
                raise
        # The extra frames go as they are (uncopied) in one transaction with finish.lua, which
        # then finds the record still this attempt's, or deletes them again. EVAL, not EVALSHA:
        # a NOSCRIPT would only show once the frames were written, and the script's text is
        # nothing next to them.
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if rest:
            commands.append(("HSET", key, *flatten(rest)))
        commands += enc.frame_commands(held.expiry)
        commands += [("EVAL", finish.script, len(keys), *keys, *args), ("EXEC",)]
        payload = [*enc.fields.values(), *enc.frames.values()]
        size = sum(memoryview(v).nbytes for v in payload if isinstance(v, (bytes, bytearray, memoryview)))
        with self.store.channels.channel() as channel:
            if self.pause_in_outcome and enc.frames:
                replies = self._pause_for_tests(channel, commands, task_id)
            else:
                replies = channel.pipeline(commands)
        raise_errors(replies, f"{what} ({size_text(size)})")
        return bool(replies[-1][-1])

    def _pause_for_tests(self, channel: Channel, commands: list[tuple[Any, ...]], task_id: str) -> list[Any]:
        """Send ``commands`` up to the first big frame, the rest only once ``<hook file>.go`` exists.

        Meanwhile a test kills or stops the worker. Returns the replies of all of them.
        """
        path = str(self.pause_in_outcome)
        upto = next(i for i, command in enumerate(commands) if command[0] == "SET") + 1
        replies = channel.pipeline(commands[:upto])
        with open(path, "a") as fh:
            fh.write(f"{task_id}\n")
        while not os.path.exists(f"{path}.go"):
            time.sleep(0.01)  # a test hook waiting on a file the test writes
        return replies + channel.pipeline(commands[upto:])


def _split_frames(fields: dict[str, Any], small: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    first = {k: v for k, v in fields.items() if k in small or k.endswith("#")}
    rest = {k: v for k, v in fields.items() if k not in first}
    return first, rest
