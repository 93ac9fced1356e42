"""Clients and their settings: the one place rtq builds or inspects a redis-py client.

* :func:`client_from_url` builds the client ``rtq.connect`` returns a queue on (one server, a
  Redis Cluster, or a master found through Sentinel: :mod:`rtq.backend.topology`);
* :func:`raw_client` gives a bytes-returning twin of a user's ``decode_responses=True`` client;
* :func:`block_cap` keeps blocking commands below the client's socket timeout;
* :func:`connection_settings` and :func:`helper_client`: the plain settings another process
  (the heartbeat helper) needs to reach the same server, and the client it makes from them;
* :func:`connection_error` says what a redis-py connection failure means (an exhausted pool is
  not an unreachable server).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import redis as redis_py
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import RtqConnectionError
from .topology import (
    SENTINEL_SCHEME,
    client_of,
    cluster_client,
    is_cluster,
    is_sentinel,
    pool_of,
    raw_twin,
    sentinel_client,
)

__all__ = [
    "CLIENT_TYPES",
    "TRANSIENT",
    "RedisError",
    "block_cap",
    "client_from_url",
    "client_options",
    "connection_error",
    "connection_settings",
    "helper_client",
    "raw_client",
]

logger = logging.getLogger("rtq.worker.heartbeat")

RedisError = redis_py.RedisError
"""The root of what redis-py raises: what layers above the backend catch, without importing redis."""
CLIENT_TYPES: tuple[type, ...] = (redis_py.Redis, redis_py.RedisCluster)
"""What ``RedisTaskQueue(redis=...)`` accepts: a redis-py client (single server or cluster)."""
TRANSIENT: tuple[type[Exception], ...] = (redis_py.ConnectionError, redis_py.TimeoutError)
"""Failures that pass (a restart, a dropped connection): retry with backoff."""

# Connection settings that travel to the helper; pools and handlers the client built for itself
# (locks, registries) cannot, and the helper chooses its own timeouts and retries.
_CONNECTION_SETTINGS = {
    "host",
    "port",
    "db",
    "username",
    "password",
    "path",
    "socket_keepalive",
    "socket_keepalive_options",
    "socket_type",
    "client_name",
    "protocol",
    "encoding",
}


class _NotPlain(Exception):
    """Raised by :func:`_plain` for a value that is not plain data."""


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
    pool: Any = pool_of(client)
    if not pool.connection_kwargs.get("decode_responses"):
        return client
    if is_cluster(client) or is_sentinel(client):
        return raw_twin(client)  # type: ignore[no-any-return]
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    twin = type(pool)(connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs)
    return redis_py.Redis(connection_pool=twin)


def block_cap(client: redis_py.Redis) -> float:
    """Longest a blocking command may wait on ``client`` without its socket timing out."""
    timeout = _socket_timeout(pool_of(client))
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


def connection_settings(client: redis_py.Redis) -> tuple[type, dict[str, Any]]:
    """The connection class and the plain settings that reach the same server as ``client``.

    Only plain data travels (str, int, float, bool, None, bytes, and lists, tuples and dicts of
    them), rebuilt from builtin types. Anything else is left out and the helper's redis-py uses
    its own default: an object unpickled in another process is a copy, and redis-py compares
    some settings with its own sentinels by identity (redis-py 8.1 gives every client made with
    keyword arguments ``socket_keepalive_options=SENTINEL``, which a copy no longer matches: the
    helper then died on every connect). A credential provider travels as the plain user name
    and password it gives now.
    """
    pool = pool_of(client)
    kwargs: dict[str, Any] = {}
    for key, value in pool.connection_kwargs.items():
        if key not in _CONNECTION_SETTINGS and not key.startswith("ssl"):
            continue
        try:
            kwargs[key] = _plain(value)
        except _NotPlain:
            logger.debug("heartbeat helper: connection setting %s is not plain data; left out", key)
    provider = pool.connection_kwargs.get("credential_provider")
    if provider is not None:
        kwargs.update(_credentials(provider))
    return _redis_py_class(pool.connection_class), kwargs


def _plain(value: Any) -> Any:
    """``value`` rebuilt from builtin types only (an IntEnum becomes its int).

    Raises:
        _NotPlain: it holds anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    raise _NotPlain(type(value).__name__)


def _credentials(provider: Any) -> dict[str, str]:
    """A credential provider's current ``username``/``password``, as plain settings."""
    try:
        credentials = tuple(provider.get_credentials())
    except Exception as exc:  # a provider of the user's own: whatever it raises, the helper goes without
        logger.warning("heartbeat helper: cannot read credentials from %s (%s)", type(provider).__name__, exc)
        return {}
    if len(credentials) == 1:
        return {"password": str(credentials[0])}
    if len(credentials) == 2:
        return {"username": str(credentials[0]), "password": str(credentials[1])}
    return {}


def _redis_py_class(cls: type) -> type:
    """The redis-py connection class ``cls`` is or derives from (the helper may not import a subclass)."""
    for base in cls.__mro__:
        if base.__module__.split(".")[0] == "redis":
            return base
    return cls


def helper_client(
    connection_class: type, connection_kwargs: dict[str, Any], timeout: float, topology: tuple[Any, ...] = ()
) -> redis_py.Redis:
    """A client from :func:`connection_settings`, with short timeouts and no hidden retries.

    With a ``topology`` (:func:`rtq.backend.topology.topology_of`): a cluster client, or one that
    finds the master through the same sentinels, so the helper follows a failover too.
    """
    if topology:
        settings = {**connection_kwargs, "socket_timeout": timeout, "socket_connect_timeout": timeout}
        return client_of(topology, settings)  # type: ignore[no-any-return]
    pool = redis_py.ConnectionPool(
        connection_class=connection_class,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **connection_kwargs,
    )
    return redis_py.Redis(connection_pool=pool)


def client_from_url(url: str, *, cluster: bool = False, **options: Any) -> redis_py.Redis:
    """``redis.Redis.from_url(url, **options)``; a Sentinel-managed client for a ``redis+sentinel://`` URL,
    a ``redis.cluster.RedisCluster`` with ``cluster``.

    Raises:
        ValueError: the URL or an option is malformed (redis-py's and urllib's own message).
    """
    if url.lower().startswith(SENTINEL_SCHEME + "://"):
        if cluster:
            raise ValueError("a Sentinel URL names one master, not a cluster: drop cluster=True")
        return sentinel_client(url, **options)
    if cluster:
        return cluster_client(url, **options)  # type: ignore[return-value]
    return redis_py.Redis.from_url(url, **options)


def client_options(client: redis_py.Redis) -> set[str]:
    """The keyword arguments ``redis.Redis.from_url`` made ``client`` with may hold.

    Unknown ones are not refused there: redis-py hands them to each connection it makes, and
    the first command fails with a ``TypeError`` from deep inside it.
    """
    pool = pool_of(client)
    names = {"single_connection_client", "sentinel_kwargs"}
    if is_cluster(client):
        names |= set(inspect.signature(redis_py.RedisCluster.__init__).parameters)
    for cls in (*type(pool).__mro__, *pool.connection_class.__mro__):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            names |= set(inspect.signature(init).parameters)
        except (TypeError, ValueError):
            continue
    return names - {"self", "args", "kwargs", "connection_kwargs"}
