"""Where a held connection (:mod:`rtq.backend.wire`) goes, and what to do when the server says "elsewhere".

On a single server, and behind Sentinel, a channel takes its connection from the client's own
pool (a Sentinel-managed pool connects to whichever server is the master now). On a Redis
Cluster a channel talks to the node that serves its queue's slot: every key of one prefix
shares one hash tag (:mod:`rtq.backend.keys`), so one node holds them all, and scripts,
``MULTI``/``EXEC`` and blocking reads followed by other commands work there as on one server.
When the slot moves (resharding, a failover) the node answers ``MOVED``; while it moves,
``ASK`` (the key is already on the importing node) or ``TRYAGAIN`` (a multi-key command whose
keys are split between both). A command refused so did not run, so sending it again where it
belongs is safe; :func:`units` keeps a transaction together when it goes again.

Replies that mean "this server no longer takes writes for you" — ``READONLY`` (a master turned
replica by a failover), ``UNBLOCKED`` (a blocked read cut off by that turn), ``MASTERDOWN`` —
become a :class:`redis.ConnectionError`, which every caller of the wire retries with backoff on
a fresh connection: through Sentinel that reaches the new master.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis as redis_py
from redis.crc import key_slot

__all__ = [
    "MAX_REDIRECTS",
    "Redirect",
    "first_key",
    "follow",
    "is_cluster",
    "learn_moved",
    "lost_master",
    "node_pool",
    "redirect_of",
    "slot_of",
    "units",
]

MAX_REDIRECTS = 32
"""Most times one pipeline is sent again after ``MOVED``/``ASK``/``TRYAGAIN`` before the error stands."""
TRYAGAIN_PAUSE_S = 0.02
"""Seconds to let a slot's migration move on before a ``TRYAGAIN`` command goes again."""
_LOST_MASTER = ("READONLY", "UNBLOCKED", "MASTERDOWN")
_KEYLESS = {b"MULTI", b"EXEC", b"DISCARD", b"ASKING", b"PING", b"SCRIPT", b"WAIT", b"INFO", b"ROLE"}


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client."""
    return isinstance(client, redis_py.RedisCluster)


class Redirect:
    """A ``MOVED``, ``ASK`` or ``TRYAGAIN`` reply: the command did not run here."""

    def __init__(self, kind: str, error: redis_py.ResponseError, host: str = "", port: int = 0, slot: int = 0) -> None:
        self.kind = kind
        self.error = error
        self.host = host
        self.port = port
        self.slot = slot


def redirect_of(reply: Any) -> Redirect | None:
    """The :class:`Redirect` ``reply`` is, or None."""
    if not isinstance(reply, redis_py.ResponseError):
        return None
    message = str(reply)
    kind = message.split(" ", 1)[0]
    if isinstance(reply, redis_py.exceptions.MovedError) and not message.startswith("MOVED"):
        kind, message = "MOVED", f"MOVED {message}"  # redis-py's parser strips the code
    elif isinstance(reply, redis_py.exceptions.AskError) and not message.startswith("ASK"):
        kind, message = "ASK", f"ASK {message}"
    elif isinstance(reply, redis_py.exceptions.TryAgainError):
        kind = "TRYAGAIN"
    if kind == "TRYAGAIN":
        return Redirect(kind, reply)
    if kind not in ("MOVED", "ASK"):
        return None
    parts = message.split()
    if len(parts) != 3:
        return None
    host, _, port = parts[2].rpartition(":")
    return Redirect(kind, reply, host.strip("[]"), int(port), int(parts[1]))


def learn_moved(client: redis_py.RedisCluster, redirect: Redirect) -> None:
    """Tell ``client``'s slot table that the slot of a ``MOVED`` reply lives at the node it names."""
    error = redis_py.exceptions.MovedError(f"{redirect.slot} {redirect.host}:{redirect.port}")
    manager: Any = client.nodes_manager
    if hasattr(manager, "move_slot"):  # redis-py >= 6
        manager.move_slot(error)
    else:  # redis-py 5: applied on the next look-up of a slot
        manager.update_moved_exception(error)


def lost_master(reply: Any) -> redis_py.ConnectionError | None:
    """The ``ConnectionError`` a reply saying the server stopped being the master means, or None."""
    if isinstance(reply, redis_py.ResponseError) and str(reply).split(" ", 1)[0] in _LOST_MASTER:
        return redis_py.ConnectionError(f"the server is no longer the master: {reply}")
    if isinstance(reply, redis_py.exceptions.ReadOnlyError):
        return redis_py.ConnectionError(f"the server is no longer the master: {reply}")
    return None


def first_key(commands: Sequence[Sequence[Any]]) -> Any:
    """The first key among ``commands`` (rtq's own: ``EVALSHA sha n key…`` or ``CMD key …``), or None."""
    for args in commands:
        if not args:
            continue
        name = args[0].encode() if isinstance(args[0], str) else bytes(args[0])
        name = name.upper()
        if name in _KEYLESS:
            continue
        if name in (b"EVALSHA", b"EVAL"):
            if len(args) > 3 and int(args[2]) > 0:
                return args[3]
            continue
        if len(args) > 1:
            return args[1]
    return None


def slot_of(key: Any) -> int:
    """The hash slot of ``key`` (str or bytes)."""
    return int(key_slot(key.encode() if isinstance(key, str) else bytes(key)))


def units(commands: Sequence[Sequence[Any]]) -> list[tuple[int, int]]:
    """``commands`` as ``(start, end)`` ranges that go again as one: a ``MULTI``…``EXEC`` block, or one command."""
    out = []
    i = 0
    while i < len(commands):
        if _name(commands[i]) == b"MULTI":
            end = next((j for j in range(i + 1, len(commands)) if _name(commands[j]) == b"EXEC"), len(commands) - 1)
            out.append((i, end + 1))
            i = end + 1
        else:
            out.append((i, i + 1))
            i += 1
    return out


def _name(args: Sequence[Any]) -> bytes:
    name = args[0] if args else b""
    return (name.encode() if isinstance(name, str) else bytes(name)).upper()


def node_pool(client: redis_py.RedisCluster, slot: int, host: str = "", port: int = 0) -> Any:
    """The connection pool of the master serving ``slot`` (or of the node at ``host:port``)."""
    manager = client.nodes_manager
    node = manager.get_node(host=host, port=port) if host else manager.get_node_from_slot(slot)
    if node is None or node.redis_connection is None:
        manager.initialize()
        node = manager.get_node(host=host, port=port) if host else manager.get_node_from_slot(slot)
    if node is None or node.redis_connection is None:
        raise redis_py.ConnectionError(f"no cluster node serves slot {slot}" + (f" at {host}:{port}" if host else ""))
    return node.redis_connection.connection_pool


def follow(channel: Any, commands: Sequence[Sequence[Any]], replies: list[Any]) -> list[Any]:
    """``replies`` of ``commands`` sent on a cluster ``channel``, with each redirected unit sent again.

    ``MOVED``: the slot table learns the slot's new master and the channel reconnects there;
    ``TRYAGAIN``: a pause while the slot moves; ``ASK``: the unit goes to the importing node,
    announced by ``ASKING``. Up to :data:`MAX_REDIRECTS` rounds, then the errors stand.
    """
    for _ in range(MAX_REDIRECTS):
        redo: list[tuple[int, int, Redirect]] = []
        for start, end in units(commands):
            found = next((r for r in map(redirect_of, replies[start:end]) if r is not None), None)
            if found is not None:
                redo.append((start, end, found))
        if not redo:
            return replies
        moved = next((r for *_, r in redo if r.kind == "MOVED"), None)
        if moved is not None:
            learn_moved(channel.client, moved)
            channel.reset()  # the next connection goes to the slot's new master
        elif any(r.kind == "TRYAGAIN" for *_, r in redo):
            time.sleep(TRYAGAIN_PAUSE_S)  # the slot is moving: give the migration a moment
        for start, end, found in redo:
            again = commands[start:end]
            replies[start:end] = _asking(channel, found, again) if found.kind == "ASK" else channel._exchange(again)
    return replies


def _asking(channel: Any, redirect: Redirect, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` on the node a slot is being imported into, announced by ``ASKING``."""
    pool = node_pool(channel.client, channel.slot or 0, redirect.host, redirect.port)
    try:
        conn = pool.get_connection()  # redis-py >= 5.3
    except TypeError:
        conn = pool.get_connection("_")  # redis-py < 5.3 requires a command name (unused)
    try:
        conn.send_packed_command(conn.pack_commands([("ASKING",), *commands]))
        replies = []
        for _ in range(len(commands) + 1):
            try:
                replies.append(conn.read_response())
            except redis_py.ResponseError as exc:
                replies.append(exc)
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return replies[1:]
