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
attempt       how many times a worker claimed it; owner / claimed: the current claim
progress      "current total time"
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
"""

from __future__ import annotations

import inspect
import json
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis as redis_py

from . import scripts
from .batching import GroupCommit
from .errors import RemoteTaskError, RtqConnectionError, SerializationError, TaskLost
from .fastpath import ChannelPool
from .keys import Keys
from .serialization import CHUNK, Serializer, UnreadablePayload
from .task import RedisTask

KEEP_S = 300.0
"""Seconds a finished task's outcome stays readable at least, even past its deadline."""
EVENTS_MAXLEN = 1000
_OUTCOME_FIELDS = ("state", "result", "result#", "error", "error#", "error_text")
OUTCOME_FIELDS = list(_OUTCOME_FIELDS)
"""The fields :meth:`TaskStore.outcome` reads, in order (to ``HMGET`` them inside a pipeline)."""


def text(value: Any) -> str:
    """A reply as ``str``, whether the client decodes responses or not."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode()
    return "" if value is None else str(value)


def connection_error(exc: BaseException, client: redis_py.Redis | None = None) -> RtqConnectionError:
    """The :class:`RtqConnectionError` that says what a redis-py connection failure means.

    A pool with every connection checked out is not an unreachable server: say so, with the
    limit and how to raise it.
    """
    if isinstance(exc, getattr(redis_py.exceptions, "MaxConnectionsError", ())) or "Too many connections" in str(exc):
        limit = getattr(getattr(client, "connection_pool", None), "max_connections", None)
        return RtqConnectionError(
            f"the Redis client's connection pool is exhausted: all {limit or 'its'} connections are in use in "
            "this process; raise the limit with redis.Redis(..., max_connections=N) or "
            "rtq.connect(url, max_connections=N)"
        )
    return RtqConnectionError(f"Redis is unreachable: {exc}")


def raw_client(client: redis_py.Redis) -> redis_py.Redis:
    """A client on the same server that returns bytes: payloads are binary.

    A user's client made with ``decode_responses=True`` would try to decode pickles as UTF-8;
    rtq then talks through a twin pool with decoding off, built from the same settings.
    """
    pool = client.connection_pool
    if not pool.connection_kwargs.get("decode_responses"):
        return client
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    twin = type(pool)(connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs)
    return redis_py.Redis(connection_pool=twin)


def block_cap(client: redis_py.Redis) -> float:
    """Longest a blocking command may wait on ``client`` without its socket timing out."""
    timeout = _socket_timeout(client.connection_pool)
    return math.inf if not timeout else max(0.05, timeout * 0.5)


def _socket_timeout(pool: Any) -> float | None:
    """The socket timeout ``pool``'s connections get, also when its kwargs leave it out.

    ``redis.Redis.from_url()`` passes no ``socket_timeout``, so the connection class's own
    default applies: 5 s in redis-py 8.
    """
    kwargs = pool.connection_kwargs
    if "socket_timeout" in kwargs:
        return kwargs["socket_timeout"]  # type: ignore[no-any-return]
    for cls in getattr(pool, "connection_class", object).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            param = inspect.signature(init).parameters.get("socket_timeout")
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default  # type: ignore[no-any-return]
    return None


class TaskStore:
    """The task-record operations of one queue namespace, over a bytes-returning client."""

    def __init__(self, client: redis_py.Redis, keys: Keys, serializer: Serializer) -> None:
        self.redis = raw_client(client)
        self.keys = keys
        self.serializer = serializer
        self.scripts = scripts.load(self.redis)
        self.cap = block_cap(self.redis)
        self.channels = ChannelPool(self.redis)  # held connections for the hot paths
        self.submitter = GroupCommit(self.redis)  # submit.lua calls of concurrent submitters

    # -- payload fields --------------------------------------------------------------------
    def encode(self, key: str, name: str, value: Any, tag: str, what: str) -> Encoded:
        """``value`` as the fields of the task's hash at ``key`` (and big frames' own keys)."""
        frames = self.serializer.dumps(value, key=key, field=name, what=what)
        out = Encoded({name: frames[0]})
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
        frames: list[Any] = [first]
        if extra and first is not None:
            # The frame list comes from Redis: check it against the envelope before fetching.
            parsed = _frame_list(extra)
            if parsed is None:
                raise SerializationError(f"payload at {key} [{name}] has a malformed frame list {extra!r}")
            tag, count, apart = parsed
            if count != self.serializer.frame_count(first, f" at {key} [{name}]"):
                raise SerializationError(f"payload at {key} [{name}] lists {count} frames; its envelope says otherwise")
            names = [f"{name}.{tag}.{i}" for i in range(count)]
            sizes = self.serializer.buffer_sizes(first)
            if not names:
                return self.serializer.loads(frames, key=key, field=name)
            if apart:
                command: tuple[Any, ...] = ("MGET", *(Keys.frame_of(key, n) for n in names))
                return self._decode_direct(key, name, first, command, count, sizes)
            if sum(sizes) >= DIRECT_READ_MIN:
                return self._decode_direct(key, name, first, ("HMGET", key, *names), count, sizes)
            frames += self.redis.hmget(key, names)
        return self.serializer.loads(frames, key=key, field=name)

    def _decode_direct(
        self, key: str, name: str, first: bytes, command: tuple[Any, ...], count: int, sizes: list[int]
    ) -> Any:
        """Read a big payload's frames straight into its buffers: one allocation, no copies."""
        buffers = [bytearray(size) for size in sizes]
        targets = []
        for buffer in buffers:
            view = memoryview(buffer)
            targets += [view[i : i + CHUNK] for i in range(0, max(len(buffer), 1), CHUNK)]
        if len(targets) != count:
            where = f"payload at {key} [{name}]"
            raise SerializationError(f"{where} lists {count} frames; its envelope says otherwise")
        with self.channels.channel() as channel:
            complete = channel.read_into(command, targets)
        if not complete:
            raise SerializationError(f"payload at {key} [{name}] is missing a frame, or one has the wrong size")
        return self.serializer.loads([first, *buffers], key=key, field=name, joined=True)

    # -- caller side -----------------------------------------------------------------------
    def record(self, task: RedisTask, *, token: str, state: str, notify: str | None) -> Encoded:
        key = self.keys.task(task.id)
        out = Encoded(
            {
                "name": task.name,
                "expiry": repr(task.expiry),
                "token": token,
                "state": state,
                "notify": notify or self.keys.done(task.id),
                "progress": f"{task.current_progress!r} {task.total_progress!r} {task.update_progress_time!r}",
            }
        )
        label = getattr(task.params, "label", None)  # a shipped call's: what `rtq status` lists it as
        if isinstance(label, str) and label:
            out.fields["label"] = label
        out.add(self.encode(key, "params", task.params, token, "params"))
        if task.error is not None:
            out.add(self.encode_error(key, task.error, token))
        elif task.result is not None or state == "done":
            out.add(self.encode(key, "result", task.result, token, "result"))
        return out

    def submit(self, tasks: Sequence[tuple[RedisTask, str, str | None]], *, listened: str | None = None) -> bool:
        """Store and enqueue tasks in one round trip: ``(task, token, notify)`` each.

        A reused id starts clean: its old record, done list and events are replaced in the same
        atomic step, so no stale result or notification leaks into the new run. Small records
        go through ``submit.lua`` (one command per task); big ones through a MULTI transaction of
        plain commands, so big buffers are never copied into Lua (and the frames of the id's
        previous big payloads are deleted with its record).

        Args:
            tasks: What to store.
            listened: A queue name: store only if a listener marks that queue (the check and
                the enqueue are one atomic step); returns False, storing nothing, if none does.
        """
        records = [(t, self.record(t, token=tok, state="queued", notify=n)) for t, tok, n in tasks]
        if any(enc.frames or _payload_size(enc.fields) > SCRIPT_ARGS_MAX for _, enc in records):
            # One round trip first: the listener check, and the frame lists of records replaced.
            with self.channels.channel() as channel:
                looked = channel.pipeline(
                    [("EXISTS", self.keys.listen(listened or "-"))]
                    + [("HMGET", self.keys.task(t.id), *LIST_FIELDS) for t, _ in records]
                )
            if listened is not None and not looked[0]:
                return False
            commands: list[tuple[Any, ...]] = [("MULTI",)]
            for (task, enc), old in zip(records, looked[1:], strict=True):
                key = self.keys.task(task.id)
                stale = self.frame_keys(key, old) if isinstance(old, list) else []
                commands += [
                    ("DEL", key, self.keys.done(task.id), self.keys.events(task.id), *stale),
                    ("HSET", key, *flatten(enc.fields)),
                    ("PEXPIREAT", key, int(task.expiry * 1000) + 1),
                    *enc.frame_commands(task.expiry),
                    ("RPUSH", self.keys.queue(task.name), task.id),
                ]
            commands.append(("EXEC",))
            with self.channels.channel() as channel:  # sends the frames as they are, uncopied
                replies = channel.pipeline(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return True
        script = self.scripts["submit"]
        calls = []
        for task, enc in records:
            fields = enc.fields
            keys = [
                self.keys.task(task.id),
                self.keys.done(task.id),
                self.keys.events(task.id),
                self.keys.queue(task.name),
            ]
            if listened is not None:
                keys.append(self.keys.listen(listened))
            args = [task.id, int(task.expiry * 1000) + 1, *flatten(fields)]
            calls.append((keys, args))
        if len(calls) == 1:
            # Concurrent submits (a thousand threads in query()) share one connection and leave
            # together in one write, instead of taking a connection each.
            replies = [self.submitter.call(script, *calls[0])]
        else:
            with self.channels.channel() as channel:
                # A batch is one transaction: a connection lost before EXEC queues none of it.
                replies = self._send_batch(channel, script, calls)
                if any(isinstance(r, redis_py.exceptions.NoScriptError) for r in replies):
                    # The server lost its scripts (restart, flush): none ran (every call is the
                    # same script), so load it and send the batch again.
                    channel.execute("SCRIPT", "LOAD", script.script)
                    replies = self._send_batch(channel, script, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # Replaced records that had big frames: submit.lua handed back their frame lists.
        stale = [
            frame
            for (task, _), reply in zip(records, replies, strict=True)
            if isinstance(reply, list)
            for frame in self.frame_keys(self.keys.task(task.id), reply[1:])
        ]
        if stale:
            self.redis.unlink(*stale)
        return all(replies)

    @staticmethod
    def _send_batch(channel: Any, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One MULTI/EXEC of ``script`` calls by SHA; the replies of the calls."""
        commands = [("MULTI",), *(("EVALSHA", script.sha, len(k), *k, *a) for k, a in calls), ("EXEC",)]
        replies = channel.pipeline(commands)
        for reply in replies[:-1]:  # MULTI's OK and each QUEUED, or an error queueing a call
            if isinstance(reply, Exception):
                raise reply
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        return list(replies[-1])

    def write(self, task: RedisTask, *, state: str | None = None) -> None:
        """Store ``task`` as it is now (``RedisTask.save``), keeping its claim and token."""
        key = self.keys.task(task.id)
        old = self.redis.hmget(key, ["token", "state"])
        token = text(old[0]) or "local"
        if state is None:
            state = (
                "failed"
                if task.error is not None
                else ("done" if task.result is not None else text(old[1]) or "running")
            )
        enc = self.record(task, token=token, state=state, notify=None)
        ttl_ms = max(int((task.expiry - time.time()) * 1000), int(KEEP_S * 1000) if state in ("done", "failed") else 1)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(key, *_OUTCOME_FIELDS[1:])
        pipe.hset(key, mapping=cast("dict[Any, Any]", enc.fields))
        pipe.pexpire(key, ttl_ms)
        for command in enc.frame_commands(task.expiry):
            pipe.execute_command(*command)
        pipe.execute()

    def read(self, task_id: str, *, once: bool = False) -> RedisTask | None:
        """The whole task record as a :class:`RedisTask`, or None when there is none."""
        key = self.keys.task(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(key)
        if once:
            pipe.delete(key, self.keys.done(task_id), self.keys.events(task_id))
        raw = {text(k): v for k, v in pipe.execute()[0].items()}
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
        if state == "done" or "result" in raw:
            task.result = self.decode(key, "result", raw.get("result"), raw.get("result#"))
        elif state == "failed":
            task.error = self.error_of(key, raw)
        if once:  # the big frames read above go with the record
            frames = self.frame_keys(key, [raw.get(f) for f in LIST_FIELDS])
            if frames:
                self.redis.delete(*frames)
        return task

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
        if state == "done":
            return state, self.decode(key, "result", raw.get("result"), raw.get("result#"))
        if state == "failed":
            return state, self.error_of(key, raw)
        return state, None

    def encode_error(self, key: str, exc: BaseException, tag: str) -> Encoded:
        """The fields that carry ``exc``: its envelope, or a :class:`RemoteTaskError` if it cannot travel."""
        tb = _clip("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        info = {"type": _qualname(type(exc)), "message": _clip(_safe_str(exc)), "traceback": tb}
        out = Encoded({"error_text": json.dumps(info)})
        try:
            out.add(self.encode(key, "error", exc, tag, "exception"))
        except SerializationError:
            out.add(self.encode(key, "error", RemoteTaskError(info["type"], info["message"], tb), tag, "exception"))
        return out

    def error_of(self, key: str, raw: dict[str, Any]) -> BaseException:
        info = _error_info(raw.get("error_text"))
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
            exc.__cause__ = _RemoteTraceback(info["traceback"])
        return exc


DIRECT_READ_MIN = 1 << 20
"""Payloads with at least this many bytes of buffers are read straight into place (rtq.fastpath)."""
FRAME_KEYS_MIN = 1 << 20
"""Payloads with at least this many bytes of buffers keep their extra frames under keys of their own."""
FRAME_SLACK_S = 60.0
"""Seconds a big frame outlives the longest its record can live (the deadline plus ``KEEP_S``)."""
LIST_NAMES = ("params", "result", "error")
"""The payload fields of a record, whose ``<name>#`` fields list their extra frames."""
LIST_FIELDS = [f"{name}#" for name in LIST_NAMES]


@dataclass
class Encoded:
    """Payloads as stored: fields of the task's hash, and big frames under keys of their own."""

    fields: dict[str, Any]
    frames: dict[str, Any] = field(default_factory=dict)

    def add(self, other: Encoded) -> None:
        self.fields.update(other.fields)
        self.frames.update(other.frames)

    def frame_commands(self, expiry: float) -> list[tuple[Any, ...]]:
        """The ``SET`` commands of the big frames (sent as they are, uncopied).

        They expire after the record can: a record lives until its deadline, or ``KEEP_S``
        past the moment it ends when that is later.
        """
        at_ms = int((max(expiry, time.time()) + KEEP_S + FRAME_SLACK_S) * 1000)
        return [("SET", key, frame, "PXAT", at_ms) for key, frame in self.frames.items()]


SCRIPT_ARGS_MAX = 256 * 1024
"""Largest record (bytes of field values) stored through ``submit.lua``; bigger ones skip Lua."""


def _payload_size(fields: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, (bytes, bytearray, memoryview, str)) else 32 for v in fields.values())


def flatten(fields: dict[str, Any]) -> list[Any]:
    """``{field: value}`` as ``[field, value, field, value, …]`` (HSET's and a script's arguments)."""
    return [item for pair in fields.items() for item in pair]


def _frame_list(listed: Any) -> tuple[str, int, bool] | None:
    """A ``<field>#`` value as ``(tag, count, under keys of their own)``; None when malformed."""
    parts = text(listed).split()
    if len(parts) not in (2, 3) or parts[2:] not in ([], ["keys"]) or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), len(parts) == 3


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a hostile or broken __str__ must not stop the outcome from being stored
        return f"<{type(exc).__name__}: str() failed>"


def _clip(value: str, limit: int = 100_000) -> str:
    """Keep error text small enough to travel whatever the payload limit."""
    return value if len(value) <= limit else value[: limit // 2] + "\n[... clipped ...]\n" + value[-limit // 2 :]


def _error_info(value: Any) -> dict[str, str]:
    """The ``error_text`` JSON as ``{type, message, traceback}``, or {} when absent or malformed."""
    try:
        info = json.loads(text(value)) if value else {}
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    return {
        "type": str(info.get("type", "Exception")),
        "message": str(info.get("message", "")),
        "traceback": str(info.get("traceback", "")),
    }


def _qualname(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class _RemoteTraceback(Exception):
    """Carries the worker-side traceback as the ``__cause__`` of a re-raised task exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.tb.rstrip()
