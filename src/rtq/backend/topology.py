"""Deployments beyond one server: Redis Cluster clients and Sentinel-managed clients.

Redis itself is the distributed engine: rtq runs on a cluster or behind Sentinel through
redis-py's own clients (:class:`redis.cluster.RedisCluster`, :class:`redis.sentinel.Sentinel`),
and this module builds them from URLs, makes their bytes-returning twins, and describes them in
plain data for another process (a worker's heartbeat helper) to build the same kind of client.

A Sentinel URL names the sentinels and the service they watch::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]

The password (and user) authenticate to the master; password-protected sentinels take
``sentinel_kwargs={"password": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis as redis_py
from redis.cluster import ClusterNode
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel, SentinelConnectionPool

from .routing import is_cluster

__all__ = [
    "SENTINEL_SCHEME",
    "SentinelURL",
    "client_of",
    "cluster_client",
    "is_cluster",
    "is_sentinel",
    "parse_sentinel_url",
    "pool_of",
    "raw_twin",
    "sentinel_client",
    "topology_of",
    "where",
]

SENTINEL_SCHEME = "redis+sentinel"
# Settings of a cluster client that redis-py adds itself; a twin gets its own.
_CLUSTER_OWN = {
    "redis_connect_func",
    "oss_cluster_maint_notifications_handler",
    "decode_responses",
    "host",
    "port",
    "db",
}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of ``redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/db]``.

    Raises:
        ValueError: the URL is malformed (the message says which part).
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != SENTINEL_SCHEME or not sep:
        raise ValueError(f"a Sentinel URL starts with {SENTINEL_SCHEME}://")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"sentinel address {item.strip()!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts:
        raise ValueError("the URL names no service: redis+sentinel://host:port/SERVICE[/db]")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"the path {'/' + '/'.join(parts)!r} is not /SERVICE[/db] (db a number)")
    return SentinelURL(sentinels, unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0, username, password)


def sentinel_client(url: str, **options: Any) -> redis_py.Redis:
    """A client of the master that the sentinels of ``url`` name now; it follows a failover."""
    parsed = parse_sentinel_url(url)
    sentinel_kwargs = options.pop("sentinel_kwargs", None)
    if sentinel_kwargs is None:  # redis-py's own default: the socket settings only
        sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    manager = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs, **options)
    auth = {k: v for k, v in (("username", parsed.username), ("password", parsed.password)) if v is not None}
    return manager.master_for(parsed.service, db=parsed.db, **auth)


def cluster_client(url: str, **options: Any) -> redis_py.RedisCluster:
    """A Redis Cluster client that discovers the cluster from the node at ``url``.

    Raises:
        redis.ConnectionError: no node answers, or the server there is no cluster node.
    """
    try:
        return redis_py.RedisCluster.from_url(url, **options)
    except RedisClusterException as exc:  # not a RedisError: say what callers catch
        raise redis_py.ConnectionError(str(exc)) from exc


def is_sentinel(client: Any) -> bool:
    """Whether ``client`` reaches its server through Sentinel."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


def pool_of(client: Any) -> Any:
    """A connection pool whose settings are ``client``'s (a cluster client: one of its nodes')."""
    if is_cluster(client):
        node = client.get_default_node() or client.get_nodes()[0]
        if node.redis_connection is None:
            client.nodes_manager.initialize()
        return node.redis_connection.connection_pool
    return client.connection_pool


def raw_twin(client: Any) -> Any:
    """A client of the same deployment that returns bytes, for a cluster or Sentinel client that decodes."""
    if is_cluster(client):
        kwargs = {k: v for k, v in client.nodes_manager.connection_kwargs.items() if k not in _CLUSTER_OWN}
        nodes = [ClusterNode(n.host, n.port) for n in client.get_nodes()]
        return redis_py.RedisCluster(startup_nodes=nodes, decode_responses=False, **kwargs)
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs["decode_responses"] = False
    twin = SentinelConnectionPool(
        pool.service_name,
        pool.sentinel_manager,
        connection_class=pool.connection_class,
        max_connections=pool.max_connections,
        is_master=pool.is_master,
        **kwargs,
    )
    return redis_py.Redis(connection_pool=twin)


def topology_of(client: Any) -> tuple[Any, ...]:
    """``client``'s deployment as plain data: ``()`` (one server), ``("cluster", nodes)`` or
    ``("sentinel", sentinels, service, sentinel_kwargs)``, for :func:`client_of` in another process."""
    if is_cluster(client):
        return ("cluster", [(str(n.host), int(n.port)) for n in client.get_nodes()])
    if is_sentinel(client):
        pool = client.connection_pool
        manager = pool.sentinel_manager
        sentinels = []
        for sentinel in manager.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            sentinels.append((str(kwargs.get("host")), int(kwargs.get("port", 26379))))
        plain = {k: v for k, v in manager.sentinel_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
        return ("sentinel", sentinels, str(pool.service_name), plain)
    return ()


def client_of(topology: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The client :func:`topology_of` described, with connection settings ``kwargs``; None for one server."""
    if not topology:
        return None
    if topology[0] == "cluster":
        rest = {k: v for k, v in kwargs.items() if k not in ("host", "port", "db", "path")}
        return redis_py.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in topology[1]], **rest)
    _, sentinels, service, sentinel_kwargs = topology
    rest = {k: v for k, v in kwargs.items() if k not in ("host", "port", "path")}
    timeouts = {k: v for k, v in rest.items() if k.startswith("socket_")}
    manager = Sentinel(sentinels, sentinel_kwargs={**timeouts, **sentinel_kwargs}, **timeouts)
    return manager.master_for(service, **{k: v for k, v in rest.items() if not k.startswith("socket_")}, **timeouts)


def where(client: Any) -> str:
    """What ``client`` talks to, for a repr: ``host:port``, ``cluster host:port,…`` or ``sentinel SERVICE``."""
    if is_cluster(client):
        return "cluster " + ",".join(f"{n.host}:{n.port}" for n in client.get_nodes()[:3])
    if is_sentinel(client):
        return f"sentinel {client.connection_pool.service_name}"
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
