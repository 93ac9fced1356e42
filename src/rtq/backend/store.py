"""Reading and writing task records in Redis: the one place that knows the task hash's fields.

A task lives in one hash, ``<p>|<s>|task-result:<id>``:

============  ==========================================================================
field         value
============  ==========================================================================
name          queue name
expiry        absolute deadline (Unix seconds)
token         random id of this submission; a reused task id gets a new one
state         queued | running | done | failed | cancelled
notify        list to push the id to when the task ends (done list or a client inbox)
session       the session (or actor) a call is aimed at: it runs there or nowhere, at most once
attempt       how many times a worker claimed it; owner / claimed: the current claim
max_attempts  claims it may use before it fails with ``WorkerLost``: the submitter's limit,
              which every reaper applies (to a record an older rtq wrote without it, its own)
progress      "current total time"
submitted     when it was submitted (Unix seconds): how long it has waited in its queue
label         what it runs (``train(3)``, a cell), for displays; absent for seed tasks
params        envelope of the parameters (``params#`` lists extra frames, see below)
result        envelope of the return value, when done
error         envelope of the exception, when failed; error_text: JSON fallback
============  ==========================================================================

A payload bigger than one frame stores its extra frames (out-of-band buffers, numpy arrays) in
fields ``<field>.<tag>.<i>`` and ``<field>#`` = ``"<tag> <n>"``; the tag is the submission token
or the attempt that wrote them, so a fenced-out worker can never overwrite the frames of a newer
attempt's result. With 1 MiB of buffers or more the frames go under keys of their own instead,
``<task key>|<field>.<tag>.<i>`` (then ``<field>#`` = ``"<tag> <n> keys"``): a server copies a
value it stores in a hash (Redis 7.0 and Valkey 8.1 both take twice as long to HSET 64 MiB as to
SET it), and keeps a plain string as it came. They expire a while after the record can, and are
deleted with it where rtq deletes a record (a consumed outcome, ``once``, a reused id).

Out-of-band buffers of 1 MiB or more are not frames at all: the envelope names them by digest,
and :mod:`rtq.backend.blobs` stores each once per namespace, sending only those Redis does not
hold yet (an :class:`Encoded` lists them; its records are queued by ``enqueue.lua`` only once all
of them are there).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis as redis_py

from ..errors import RemoteTaskError, SerializationError, TaskLost
from ..outofband import read_target
from ..serialization import CHUNK, Serializer, UnreadablePayload
from ..task import FINAL_STATES, RedisTask, TaskState, current_task
from . import scripts
from .batching import GroupCommit, SendAhead
from .blobs import Blobs, keep_ms
from .connections import block_cap, raw_client
from .durability import Ack
from .encoded import KEEP_S, LIST_FIELDS, LIST_NAMES, Encoded, flatten, frames_until
from .failures import RemoteTraceback, describe_error, error_info
from .keys import Keys
from .replies import out_of_memory, raise_errors
from .submits import Submits
from .wire import ChannelPool

EVENTS_MAXLEN = 1000
_OUTCOME_FIELDS = ("state", "result", "result#", "error", "error#", "error_text")
OUTCOME_FIELDS = list(_OUTCOME_FIELDS)
"""The fields :meth:`TaskStore.outcome` reads, in order (to ``HMGET`` them inside a pipeline)."""


def text(value: Any) -> str:
    """A reply as ``str``, whether the client decodes responses or not."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode()
    return "" if value is None else str(value)


class TaskStore:
    """The task-record operations of one queue namespace, over a bytes-returning client.

    Args:
        client: The user's client (a twin that returns bytes is made if it decodes).
        keys: The namespace's key names.
        serializer: Envelopes payloads.
        max_attempts: The attempt limit stored with each task this side submits.
        durable: Wait for a replica to acknowledge submits and outcomes (:mod:`rtq.backend.durability`).
    """

    def __init__(
        self,
        client: redis_py.Redis,
        keys: Keys,
        serializer: Serializer,
        *,
        max_attempts: int = 3,
        durable: bool = False,
    ) -> None:
        self.redis = raw_client(client)
        self.submit_ack = Ack(strict=True) if durable else None
        self.outcome_ack = Ack(strict=False) if durable else None
        self.keys = keys
        self.serializer = serializer
        self.max_attempts = max_attempts
        self.scripts = scripts.load(self.redis)
        self.cap = block_cap(self.redis)
        self.channels = ChannelPool(self.redis)  # held connections for the hot paths
        self.submitter = GroupCommit(self.redis, ack=self.submit_ack)  # submit.lua calls of concurrent submitters
        self.blobs = Blobs(self.redis, keys, self.channels, self.scripts, signed=serializer.signed)
        self.ahead = SendAhead(self.redis)  # submit.lua calls whose submitter goes on (Executor.submit)
        self.submits = Submits(self)

    # -- payload fields --------------------------------------------------------------------
    def encode(self, key: str, name: str, value: Any, tag: str, what: str, *, expiry: float = 0.0) -> Encoded:
        """``value`` as the fields of the task's hash at ``key`` (and big frames' own keys).

        Its big buffers go by digest: one round trip asks which Redis holds (keeping them as
        long as a record due at ``expiry`` can be read), and only the others are to be sent.

        Raises:
            SerializationError: ``value`` cannot be pickled, or what it sends is over ``max_payload``.
        """
        packed = self.serializer.pack(value, key=key, field=name, what=what)
        frames = packed.frames
        out = Encoded({name: frames[0]})
        if packed.blobs:
            refs = [ref for ref, _ in packed.blobs]
            held = self.blobs.held(refs, keep_ms(frames_until(expiry)))
            out.blobs = [(ref, buffer, self.blobs.part_keys(ref)) for ref, buffer in packed.blobs]
            out.send = {ref.name for ref in refs if ref.name not in held}
            sent = sum(ref.size for ref in refs if ref.name in out.send)
            self.serializer.check_size(packed.inline_size + sent, what)
        extra = frames[1:]
        if extra:
            apart = sum(memoryview(f).nbytes for f in extra) >= FRAME_KEYS_MIN
            out.fields[f"{name}#"] = f"{tag} {len(extra)}" + (" keys" if apart else "")
            for i, frame in enumerate(extra):
                if apart:
                    out.frames[Keys.frame_of(key, f"{name}.{tag}.{i}")] = frame
                else:
                    out.fields[f"{name}.{tag}.{i}"] = frame
        return out

    @staticmethod
    def frame_keys(key: str, lists: Sequence[Any]) -> list[str]:
        """The keys of the big frames that a record's frame lists name.

        Args:
            key: The task's key.
            lists: The record's :data:`LIST_FIELDS` values, in that order (None where absent).
        """
        found = []
        for name, listed in zip(LIST_NAMES, lists, strict=True):
            parsed = _frame_list(listed) if listed else None
            if parsed is not None and parsed[2]:
                tag, count, _ = parsed
                found += [Keys.frame_of(key, f"{name}.{tag}.{i}") for i in range(count)]
        return found

    def decode(self, key: str, name: str, first: bytes | None, extra: bytes | None) -> Any:
        """The value stored at ``key``/``name``: its first frame as read, ``extra`` its frame list.

        Nothing is fetched or allocated for the extra frames on the word of their envelope alone
        (it is not verified before they are read): their number and sizes are checked against
        ``max_payload`` first, and big ones against what Redis actually holds.

        Raises:
            SerializationError: the payload is malformed, too big, or its frames do not match.
            SignatureError: it does not verify (a secret is set).
        """
        frames: list[Any] = [first]
        if extra and first is not None:
            # The frame list comes from Redis: check it against the envelope before fetching.
            parsed = _frame_list(extra)
            if parsed is None:
                raise SerializationError(f"payload at {key} [{name}] has a malformed frame list {extra!r}")
            tag, count, apart = parsed
            lengths = self.serializer.frame_sizes(first, f" at {key} [{name}]")
            if count != len(lengths):
                raise SerializationError(f"payload at {key} [{name}] lists {count} frames; its envelope says otherwise")
            names = [f"{name}.{tag}.{i}" for i in range(count)]
            if not names:
                return self.serializer.loads(frames, key=key, field=name, blobs=self.blobs)
            if apart or sum(lengths) >= DIRECT_READ_MIN:
                return self._decode_direct(key, name, first, names, apart, lengths)
            frames += self.redis.hmget(key, names)
        return self.serializer.loads(frames, key=key, field=name, blobs=self.blobs)

    def _decode_direct(
        self, key: str, name: str, first: bytes, names: list[str], apart: bool, lengths: list[int]
    ) -> Any:
        """Read a big payload's frames straight into its buffers: one allocation, no copies.

        The frames' lengths in Redis (``STRLEN`` / ``HSTRLEN``) travel in the same write as
        their read, and the buffers are allocated only once they match the envelope: a forged
        envelope announcing gigabytes costs nothing but its refusal.
        """
        where = f"payload at {key} [{name}]"
        if apart:
            frame_keys = [Keys.frame_of(key, n) for n in names]
            measure: list[tuple[Any, ...]] = [("STRLEN", k) for k in frame_keys]
            command: tuple[Any, ...] = ("MGET", *frame_keys)
        else:
            measure = [("HSTRLEN", key, n) for n in names]
            command = ("HMGET", key, *names)
        buffers: list[bytes | bytearray] = []

        def targets(held: list[Any]) -> list[memoryview]:
            for i, (have, want) in enumerate(zip(held, lengths, strict=True)):
                if have != want:
                    stored = f"{have} bytes" if isinstance(have, int) else "not a string"
                    raise SerializationError(
                        f"{where} is missing a frame, or one has the wrong size (frame {i}: {stored} in Redis, "
                        f"{want} announced)"
                    )
            sizes, kinds = self.serializer.buffer_sizes(first), self.serializer.inline_bytes(first)
            views = []
            for size, as_bytes in zip(sizes, kinds, strict=True):
                buffer, view = read_target(size, as_bytes)
                buffers.append(buffer)
                views += [view[i : i + CHUNK] for i in range(0, max(size, 1), CHUNK)]
            return views

        with self.channels.channel() as channel:
            complete = channel.read_into(command, targets, measure=measure)
        if not complete:  # changed between its length and its read
            raise SerializationError(f"{where} is missing a frame, or one has the wrong size")
        return self.serializer.loads([first, *buffers], key=key, field=name, joined=True, blobs=self.blobs)

    # -- caller side -----------------------------------------------------------------------
    def record(
        self, task: RedisTask, *, token: str, state: str, notify: str | None, extra: dict[str, str] | None = None
    ) -> Encoded:
        key = self.keys.task(task.id)
        out = Encoded(
            {
                **(extra or {}),
                "name": task.name,
                "expiry": repr(task.expiry),
                "token": token,
                "state": state,
                "notify": notify or self.keys.done(task.id),
                "max_attempts": str(self.max_attempts),
                "progress": f"{task.current_progress!r} {task.total_progress!r} {task.update_progress_time!r}",
                "submitted": repr(time.time()),
            }
        )
        label = getattr(task.params, "label", None)  # a shipped call's: what `rtq status` lists it as
        if isinstance(label, str) and label:
            out.fields["label"] = label
        out.add(self.encode(key, "params", task.params, token, "params", expiry=task.expiry))
        if task.error is not None:
            out.add(self.encode_error(key, task.error, token))
        elif task.result is not None or state == TaskState.DONE:
            out.add(self.encode(key, "result", task.result, token, "result", expiry=task.expiry))
        return out

    def submit(
        self,
        tasks: Sequence[tuple[RedisTask, str, str | None]],
        *,
        listened: str | None = None,
        into: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Store and enqueue tasks in one round trip: :meth:`rtq.backend.submits.Submits.submit`."""
        return self.submits.submit(tasks, listened=listened, into=into, extra=extra)

    def submit_soon(
        self, task: RedisTask, token: str, notify: str, stored: Callable[[BaseException | None], object]
    ) -> None:
        """Store and enqueue ``task`` without waiting for Redis: :meth:`rtq.backend.submits.Submits.submit_soon`."""
        self.submits.submit_soon(task, token, notify, stored)

    def with_ack(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``commands``, and a durable store's ``WAIT`` after them."""
        return commands if self.submit_ack is None else [*commands, self.submit_ack.command]

    def acked(self, replies: list[Any], what: str) -> list[Any]:
        """``replies`` without the ``WAIT``'s, which :meth:`with_ack` added and which is checked here."""
        if self.submit_ack is None:
            return replies
        *replies, acked = replies
        if not out_of_memory(replies) and not any(isinstance(r, Exception) for r in replies):
            self.submit_ack.check(acked, what)
        return replies

    def write(self, task: RedisTask, *, state: str | None = None) -> None:
        """Store ``task`` as it is now (``RedisTask.save``), keeping its claim and token.

        Without ``state``: failed with an error, done with a result, else the state stored; a
        new record is ``queued`` — the seed's submission is ``set_task`` plus an RPUSH of the id
        on its queue, which a listener then runs — unless the task runs in this very thread
        (its progress saved during a local run), which makes it ``running``.
        """
        key = self.keys.task(task.id)
        old = self.redis.hmget(key, ["token", "state"])
        token = text(old[0]) or uuid.uuid4().hex
        if state is None:
            state = (
                TaskState.FAILED
                if task.error is not None
                else (
                    TaskState.DONE
                    if task.result is not None
                    else text(old[1]) or (TaskState.RUNNING if current_task() is task else TaskState.QUEUED)
                )
            )
        enc = self.record(task, token=token, state=state, notify=None)
        ttl_ms = max(int((task.expiry - time.time()) * 1000), int(KEEP_S * 1000) if state in FINAL_STATES else 1)
        blobs = enc.blob_commands(task.expiry)
        if blobs:
            with self.channels.channel() as channel:
                raise_errors(channel.pipeline(blobs), f"the buffers of task {task.id}")
        # One transaction on a held connection (a cluster client's pipelines have none).
        commands: list[tuple[Any, ...]] = [
            ("MULTI",),
            ("HDEL", key, *_OUTCOME_FIELDS[1:]),
            ("HSET", key, *flatten(enc.fields)),
            ("PEXPIRE", key, ttl_ms),
            *enc.frame_commands(task.expiry),
            ("EXEC",),
        ]
        with self.channels.channel() as channel:
            replies = self.acked(channel.pipeline(self.with_ack(commands)), f"task {task.id}")
        raise_errors(replies, f"task {task.id}")

    def read(self, task_id: str, *, once: bool = False) -> RedisTask | None:
        """The whole task record as a :class:`RedisTask`, or None when there is none."""
        key = self.keys.task(task_id)
        commands: list[tuple[Any, ...]] = [("MULTI",), ("HGETALL", key)]
        if once:
            commands.append(("DEL", key, self.keys.done(task_id), self.keys.events(task_id)))
        with self.channels.channel() as channel:
            replies = channel.pipeline([*commands, ("EXEC",)])
        raise_errors(replies, f"the read of task {task_id}")
        raw = {text(k): v for k, v in _pairs(replies[-1][0])}
        if not raw:
            return None
        params = self.decode(key, "params", raw.get("params"), raw.get("params#")) if "params" in raw else None
        current, total, at = (text(raw.get("progress")) or "0 100 0").split()
        task = RedisTask(
            id=task_id,
            name=text(raw.get("name")),
            params=params,
            expiry=float(text(raw.get("expiry")) or 0),
            update_progress_time=float(at),
            current_progress=float(current),
            total_progress=float(total),
        )
        state = text(raw.get("state"))
        if state == TaskState.DONE or "result" in raw:
            task.result = self.decode(key, "result", raw.get("result"), raw.get("result#"))
        elif state == TaskState.FAILED:
            task.error = self.error_of(key, raw)
        if once:  # the big frames read above go with the record
            frames = self.frame_keys(key, [raw.get(f) for f in LIST_FIELDS])
            if frames:
                self.redis.delete(*frames)
        return task

    def exists(self, task_id: str) -> bool:
        """Whether a record of task ``task_id`` is stored."""
        return bool(self.redis.exists(self.keys.task(task_id)))

    def mark_listened(self, name: str, ttl: float) -> None:
        """Mark queue ``name`` as listened for ``ttl`` seconds (``TaskExecutePolicy.Auto`` routes there)."""
        self.redis.set(self.keys.listen(name), "1", px=int(ttl * 1000))

    def listened(self, name: str) -> bool:
        """Whether a listener marks queue ``name`` now."""
        return bool(self.redis.exists(self.keys.listen(name)))

    def cancel(self, task_id: str, *, running: bool = True) -> str | None:
        """``cancel.lua``: a queued task never runs; a running one (unless ``running`` is False) is told to stop.

        Returns the state it was in, or None when the task is unknown.
        """
        key = self.keys.task(task_id)
        name, notify = self.redis.hmget(key, ["name", "notify"])
        if name is None:
            return None
        state = self.scripts["cancel"](
            keys=[key, self.keys.queue(text(name)), text(notify) or self.keys.done(task_id), self.keys.events(task_id)],
            args=[task_id, repr(time.time()), int(KEEP_S * 1000), "0" if running else "1"],
        )
        return text(state) or None

    def discard(self, task_id: str) -> None:
        """Delete a task's record, done list, events and big frames (its outcome was consumed)."""
        key = self.keys.task(task_id)
        frames = self.frame_keys(key, self.redis.hmget(key, LIST_FIELDS))
        self.redis.delete(key, self.keys.done(task_id), self.keys.events(task_id), *frames)

    def outcome(self, task_id: str, values: Sequence[Any] | None = None) -> tuple[str, Any]:
        """``(state, value)`` of a task: its result when done, its exception when failed.

        Args:
            task_id: The task.
            values: Its :data:`OUTCOME_FIELDS` as already read (an ``HMGET`` sent along with
                other commands); read now when None.

        Raises:
            TaskLost: the task's record is gone.
        """
        key = self.keys.task(task_id)
        if values is None:
            values = self.redis.hmget(key, list(_OUTCOME_FIELDS))
        raw = {f: v for f, v in zip(_OUTCOME_FIELDS, values, strict=True) if v is not None}
        state = text(raw.get("state"))
        if not state:
            raise TaskLost(f"task {task_id}'s data vanished from Redis (restart, eviction or flush)")
        if state == TaskState.DONE:
            return state, self.decode(key, "result", raw.get("result"), raw.get("result#"))
        if state == TaskState.FAILED:
            return state, self.error_of(key, raw)
        return state, None

    def encode_error(self, key: str, exc: BaseException, tag: str) -> Encoded:
        """The fields that carry ``exc``: its envelope, or a :class:`RemoteTaskError` if it cannot travel."""
        info = describe_error(exc)
        out = Encoded({"error_text": json.dumps(info)})
        try:
            out.add(self.encode(key, "error", exc, tag, "exception"))
        except SerializationError:
            stand_in = RemoteTaskError(info["type"], info["message"], info["traceback"])
            out.add(self.encode(key, "error", stand_in, tag, "exception"))
        return out

    def error_of(self, key: str, raw: dict[str, Any]) -> BaseException:
        info = error_info(raw.get("error_text"))
        try:
            exc = self.decode(key, "error", raw.get("error"), raw.get("error#"))
        except SerializationError as err:
            # The JSON text is unsigned: with a secret it only stands in for an exception whose
            # envelope verified but cannot be rebuilt here (its type is missing on this side).
            if not info or (self.serializer.signed and not isinstance(err, UnreadablePayload)):
                raise
            return RemoteTaskError(info["type"], info["message"], info["traceback"])
        if not isinstance(exc, BaseException):
            return RemoteTaskError(type(exc).__name__, repr(exc))
        if info.get("traceback") and exc.__cause__ is None and not isinstance(exc, RemoteTaskError):
            exc.__cause__ = RemoteTraceback(info["traceback"])
        return exc


DIRECT_READ_MIN = 1 << 20
"""Payloads with at least this many bytes of buffers are read straight into place (rtq.backend.wire)."""
FRAME_KEYS_MIN = 1 << 20
"""Payloads with at least this many bytes of buffers keep their extra frames under keys of their own."""


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """An ``HGETALL`` reply as read off the wire (a flat list in RESP2, a map in RESP3) as pairs."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _frame_list(listed: Any) -> tuple[str, int, bool] | None:
    """A ``<field>#`` value as ``(tag, count, under keys of their own)``; None when malformed."""
    parts = text(listed).split()
    if len(parts) not in (2, 3) or parts[2:] not in ([], ["keys"]) or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), len(parts) == 3
