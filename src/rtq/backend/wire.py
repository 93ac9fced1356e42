"""Commands on a held connection: rtq's hot paths without redis-py's per-command overhead.

``redis.Redis.execute_command`` checks a connection out of the pool for every command (with a
``poll()`` for stale data, retry wrappers and, in redis-py 8, metrics hooks). On a small machine
that costs two to four times the CPU of the round trip itself, and a task's trip from caller to
worker and back is a handful of commands. A :class:`Channel` holds one connection of the
client's own pool — so the same host, credentials, TLS, protocol and timeouts — and sends
commands through it directly, pipelined when there are several. With hiredis installed (the
``fast`` extra) commands are packed and replies parsed in C, which cuts the CPU time of a no-op
task's trip by about a sixth on each side; without it rtq's own RESP code does the same work.

Any failure disconnects the held connection, so a half-read reply never reaches the next
command; the next command reconnects. Errors reach the caller as redis-py raises them
(``ConnectionError``, ``TimeoutError``; a ``ResponseError`` of one pipelined command is returned
in its place), and rtq's callers already retry connection errors with backoff. Commands here are
never retried transparently: a claim or a submit must not run twice. :func:`raise_errors` raises
the first error among a pipeline's replies, a refusal for lack of memory (``maxmemory``) as
:class:`~rtq.errors.RedisFull`.

What this is NOT: a general client. Replies come raw (no response callbacks: ``BLPOP`` gives a
list, ``HGETALL`` a flat list in RESP2 and a dict in RESP3), and a channel serves one thread at
a time.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis as redis_py

from . import resp
from .routing import first_key, follow, is_cluster, lost_master, node_pool, slot_of

__all__ = ["Channel", "ChannelPool", "call_script", "pid"]

_pid = os.getpid()


def _forked() -> None:  # pragma: no cover - runs in a forked child
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """This process's id, kept across forks without a system call each time.

    Channels, batchers and the collector check it on every command, so a forked child never
    shares its parent's socket; ``os.getpid()`` is a system call per check.
    """
    return _pid


class Channel:
    """One held connection of ``client``'s pool, for one thread (or one lock-holder) at a time.

    On a Redis Cluster, a connection to the master of the slot its commands' keys hash to
    (one slot per queue namespace), following ``MOVED`` and ``ASK`` (:mod:`rtq.backend.routing`).
    """

    def __init__(self, client: redis_py.Redis | redis_py.RedisCluster) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self.pool: Any = None if self.cluster else client.connection_pool  # type: ignore[union-attr]
        self.slot: int | None = None  # a cluster channel's, learnt from its first command with a key
        self._conn: Any = None
        self._reader: resp.Reader | None = None
        self._encoding = "utf-8"
        self._pid = pid()

    def _connection(self, commands: Sequence[Sequence[Any]] = ()) -> Any:
        if self._pid != pid():  # a forked child must not share the parent's socket
            self._conn, self._pid = None, pid()
        if self._conn is None:
            if self.cluster:
                if self.slot is None:
                    key = first_key(commands)
                    if key is None:
                        raise ValueError("a cluster channel's first command must name a key")
                    self.slot = slot_of(key)
                self.pool = node_pool(self.client, self.slot)  # type: ignore[arg-type]
            conn = _checkout(self.pool)  # connected, with nothing left to read on it
            self._conn = conn
            self._reader = resp.Reader(conn) if _readable(conn) else None
            self._encoding = getattr(getattr(conn, "encoder", None), "encoding", "utf-8")
        return self._conn

    def execute(self, *args: Any) -> Any:
        """Send one command and return its raw reply (an error reply is raised)."""
        reply = self.pipeline([args])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies in order.

        A command answered with an error gets the ``ResponseError`` in its place; a blocking
        command holds back the replies of those behind it until it returns (the server runs
        them in order), which is how a wake-up and a read share one round trip. A reply that
        says the server is no longer the master (a failover) drops the connection and raises
        ``ConnectionError``, which callers retry.
        """
        replies = self._exchange(commands)
        if self.cluster and any(isinstance(reply, redis_py.ResponseError) for reply in replies):
            replies = follow(self, commands, replies)
        return replies

    def _exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """:meth:`send` then :meth:`receive`."""
        self.send(commands)
        return self.receive(len(commands))

    def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Write ``commands`` in one write without reading their replies (:meth:`receive` them, in order)."""
        conn = self._connection(commands)
        try:
            packed = resp.pack(commands, self._encoding) if self._reader is not None else None
            conn.send_packed_command(packed if packed is not None else conn.pack_commands(commands))
        except BaseException:
            self.reset()  # part of a command may be on the wire: never reuse this socket
            raise

    def receive(self, count: int) -> list[Any]:
        """Read the replies of the ``count`` commands sent last (errors in their place, as :meth:`pipeline`).

        A reply that says the server is no longer the master (a failover) drops the connection
        and raises ``ConnectionError``, which callers retry.
        """
        conn = self._connection()
        reader = self._reader
        replies: list[Any] = []
        try:
            for _ in range(count):
                if reader is not None:
                    replies.append(reader.reply())
                    continue
                try:
                    replies.append(conn.read_response())
                except redis_py.ResponseError as exc:  # the connection is still in step
                    replies.append(exc)
            if reader is not None and reader.pending():
                raise redis_py.ConnectionError("unexpected data after the replies")
        except BaseException:
            self.reset()  # the rest of a reply may still be on the wire: never reuse this socket
            raise
        for reply in replies:
            lost = lost_master(reply) if isinstance(reply, redis_py.ResponseError) else None
            if lost is not None:
                self.reset()
                raise lost
        return replies

    def read_into(
        self,
        command: Sequence[Any],
        targets: Sequence[memoryview] | Callable[[list[Any]], Sequence[memoryview]],
        *,
        measure: Sequence[Sequence[Any]] = (),
    ) -> bool:
        """Run ``command`` (``HMGET`` or ``MGET``) with each value read straight into its target buffer.

        For big payload frames: no intermediate copies (the parser's buffer, a ``bytes`` object,
        a join). Returns False when a value is missing or not exactly its target's size (the
        targets' contents are then undefined); raises on connection errors.

        Args:
            command: The read.
            targets: One buffer per value; or, with ``measure``, a function given the replies
                of ``measure`` that returns them (allocating nothing before it knows the sizes).
                An exception it raises is raised here, the read left unread (the connection is
                dropped).
            measure: Commands sent in the same write, just before ``command`` (``STRLEN``…).
        """
        conn = self._connection([command])
        reader = self._reader
        if reader is None:
            *held, values = self.pipeline([*measure, command])
            if isinstance(values, Exception):
                raise values
            if callable(targets):
                targets = targets(held)
            for value, target in zip(values, targets, strict=True):
                if value is None or len(value) != target.nbytes:
                    return False
                target[:] = value
            return True
        try:
            conn.send_packed_command(resp.pack([*measure, command], self._encoding))
            if callable(targets):
                # rtq's own parser, never hiredis's: hiredis may buffer the start of the read's
                # reply, which bulks_into must find in rtq's buffer.
                targets = targets([reader.own_reply() for _ in measure])
            ok = reader.bulks_into(targets)
            if reader.pending():
                raise redis_py.ConnectionError("unexpected data after the reply")
        except BaseException:
            self.reset()
            raise
        return ok

    def load(self, script: Any) -> None:
        """Load a registered ``Script`` where this channel's commands run (after a ``NOSCRIPT``).

        On a cluster, on every master: a command sent again after ``ASK`` or ``MOVED`` runs on
        another node than the one that answered, and a script loaded only here would be missing
        there.
        """
        if self.cluster:
            self.client.script_load(script.script)
        else:
            self.execute("SCRIPT", "LOAD", script.script)

    def reset(self) -> None:
        """Drop the held connection (disconnected); the next command gets a fresh one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self.pool.release(conn)

    def stale(self) -> bool:
        """Whether the idle held connection has something to read: then it must carry nothing.

        An idle connection with data waiting was closed by the server (a restart, a client
        timeout) or holds stray bytes; a command sent on it would fail, or read the wrong reply.
        One ``poll`` of the socket, no round trip.
        """
        sock = getattr(self._conn, "_sock", None)
        if not isinstance(sock, socket.socket):
            return False
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Give the held connection back to the pool."""
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == pid():
            self.pool.release(conn)


def _checkout(pool: Any) -> Any:
    try:
        return pool.get_connection()  # redis-py >= 5.3 (8.x warns when given a command name)
    except TypeError:
        return pool.get_connection("_")  # redis-py < 5.3 requires one (unused)


def _readable(conn: Any) -> bool:
    """Whether rtq may read ``conn``'s replies itself (a plain redis-py socket connection)."""
    return isinstance(getattr(conn, "_sock", None), socket.socket)


class ChannelPool:
    """Channels for the threads of one client, lent one call at a time."""

    def __init__(self, client: redis_py.Redis, keep: int = 8) -> None:
        self.client = client
        self.keep = keep
        self._idle: list[Channel] = []
        self._lock = threading.Lock()

    @contextmanager
    def channel(self) -> Iterator[Channel]:
        with self._lock:
            channel = self._idle.pop() if self._idle else None
        if channel is None:
            channel = Channel(self.client)
        elif channel.stale():  # the server closed it while it sat idle: start afresh
            channel.reset()
        try:
            yield channel
        finally:
            with self._lock:
                if len(self._idle) < self.keep:
                    self._idle.append(channel)
                    channel = None  # type: ignore[assignment]
            if channel is not None:
                channel.close()


def call_script(channel: Channel, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run a registered ``Script`` by its SHA on ``channel``; loads it first if the server lost it."""
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    reply = channel.pipeline([command])[0]
    if isinstance(reply, redis_py.exceptions.NoScriptError):  # a restarted or flushed server
        channel.load(script)
        reply = channel.pipeline([command])[0]
    if isinstance(reply, Exception):
        raise reply
    return reply
