"""``rtq.connect()``: one call from a URL (or nothing) to a ready :class:`RedisTaskQueue`."""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from .backend.connections import RedisError, client_from_url, client_options
from .backend.topology import SENTINEL_SCHEME, parse_sentinel_url
from .errors import ConfigurationError, RtqConnectionError
from .task_queue import RedisTaskQueue

__all__ = ["connect", "is_local_url", "redact_url", "resolve_url"]

_QUEUE_OPTIONS = set(inspect.signature(RedisTaskQueue).parameters) - {"redis", "prefix", "secret"}


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``RTQ_REDIS_URL``, else the URL of this process's embedded server.

    Raises:
        TypeError: ``url`` is neither None nor a str.
        ConfigurationError: ``url`` is empty, or names no place to connect to (``0.0.0.0``).
    """
    if url is not None:
        return _check_url(url, "url")
    env = os.environ.get("RTQ_REDIS_URL")
    if env:
        return _check_url(env, "RTQ_REDIS_URL")
    from .server import default_server

    return default_server().url


def _check_url(url: Any, what: str) -> str:
    if not isinstance(url, str):
        raise TypeError(
            f"{what} must be a Redis URL string such as redis://HOST:6379/0 (or None), not {type(url).__name__}"
        )
    if not url.strip():
        raise ConfigurationError(
            f"{what} is empty: pass a Redis URL such as redis://HOST:6379/0, or None for RTQ_REDIS_URL "
            "(else an embedded server)"
        )
    if "://" in url and _unspecified(_host(url)):
        raise ConfigurationError(
            f"{redact_url(url)!r} names no place to connect to: {_host(url)} means 'every address of this "
            "machine' to a server that listens; connect to 127.0.0.1 (this machine) or the server's own address"
        )
    return url


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:  # a malformed URL: redis-py names the problem when it parses it
        return ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address, in every spelling a socket takes (``127.1``, ``0x7f.0.0.1``, ``::ffff:127.0.0.1``)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not host[:1].isdigit():
            return None
        try:  # the short and hex forms inet_aton reads, as the connecting socket will
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _unspecified(host: str) -> bool:
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at this machine: a unix socket, ``localhost``, a loopback address in any
    spelling (``127.0.0.1``, ``127.1``, ``::1``, ``::ffff:127.0.0.1``), or this machine's own host name.

    ``0.0.0.0`` is not: it is no address to connect to (:func:`connect` refuses it).
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    if parts.scheme == SENTINEL_SCHEME:  # the master is wherever the sentinels say; here if they all are
        try:
            sentinels = parse_sentinel_url(url).sentinels
        except ValueError:
            return False
        return all(
            is_local_url(f"redis://[{host}]:{port}" if ":" in host else f"redis://{host}:{port}")
            for host, port in sentinels
        )
    host = _host(url)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip(host)
    if ip is not None:
        return ip.is_loopback
    own = socket.gethostname().lower().rstrip(".")
    # Another host name may resolve anywhere; this machine's own name (short or full) is here.
    return bool(host) and host in {own, own.split(".")[0]}


def connect(
    url: str | None = None,
    prefix: str = "rtq",
    *,
    secret: str | bytes | Sequence[str | bytes] | None = None,
    cluster: bool = False,
    **options: Any,
) -> RedisTaskQueue:
    """Connect to Redis and return a queue.

    Args:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://…`` (TLS),
            ``unix:///path.sock``, or ``redis+sentinel://[:password@]host:port[,host:port…]/SERVICE[/db]``
            (the master that Sentinel names; a failover is followed). Default: ``RTQ_REDIS_URL``,
            else an embedded server that this process starts (``pip install "rtq[server]"``).
        prefix: First part of every key; queues with different prefixes never meet.
        secret: Sign payloads (default: ``RTQ_SECRET``). See :class:`RedisTaskQueue`.
        cluster: ``url`` is a node of a Redis Cluster: the queue's keys share the hash tag
            ``{prefix}``, so they live in one slot (see docs/scale-out.md).
        **options: ``RedisTaskQueue`` options (``suffix``, ``timeout``, ``interval``,
            ``task_fn``, ``max_payload``, ``max_attempts``, ``durable``); anything else goes to
            ``redis.Redis.from_url`` (e.g. ``socket_timeout``, ``ssl_ca_certs``), to
            ``redis.cluster.RedisCluster.from_url`` with ``cluster``, or to
            ``redis.sentinel.Sentinel`` for a Sentinel URL (``sentinel_kwargs`` for the sentinels).

    Raises:
        RtqConnectionError: Redis does not answer at ``url``.
        ConfigurationError: ``url`` is malformed.
    """
    queue_kwargs = {k: options.pop(k) for k in list(options) if k in _QUEUE_OPTIONS}
    resolved = resolve_url(url)
    try:
        client = client_from_url(resolved, cluster=cluster, **options)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redact_url(resolved)!r}: {_scrub(str(exc), resolved)}") from exc
    except RedisError as exc:  # a cluster client discovers its nodes as it is made
        raise RtqConnectionError(f"cannot reach Redis at {redact_url(resolved)}: {_scrub(str(exc), resolved)}") from exc
    unknown = sorted(set(options) - client_options(client))
    if unknown:
        client.close()
        raise ConfigurationError(
            f"connect() got unknown option(s) {', '.join(map(repr, unknown))}: neither a RedisTaskQueue option "
            f"({', '.join(sorted(_QUEUE_OPTIONS | {'secret'}))}) nor a setting of redis.Redis.from_url "
            "(socket_timeout, max_connections, ssl_ca_certs, …)"
        )
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        client.close()
        raise RtqConnectionError(f"cannot reach Redis at {redact_url(resolved)}: {_scrub(str(exc), resolved)}") from exc
    return RedisTaskQueue(client, prefix, secret=secret, **queue_kwargs)


# A query parameter whose value is a secret: ``password``, ``ssl_password``, ``…token``, ``…secret``.
_SECRET_PARAMETER = re.compile(r"(?i)([?&;][^=&;#]*(?:pass|secret|token)[^=&;#]*=)([^&;#]*)")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for messages, logs and reprs.

    It never raises, and it errs on the side of hiding: the password of ``user:password@`` and
    ``:password@`` goes (also one holding ``@``, ``:`` or percent-escapes, and one so badly
    escaped that its ``/``, ``?`` or ``#`` makes the host look like part of the path), and so do
    the values of query parameters named like secrets (``?password=…``, ``ssl_password=…``).
    """
    return _redact(url)[0]


def _redact(url: str) -> tuple[str, list[str]]:
    """:func:`redact_url`'s result, and the secrets it took out."""
    hidden: list[str] = []
    scheme, sep, rest = url.partition("://")
    if sep:
        # The authority ends at the first "/", "?" or "#"; the user info at its last "@".
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        userinfo, at, host = rest[:end].rpartition("@")
        if at:
            rest = _without_password(userinfo, hidden) + "@" + host + rest[end:]
        elif "@" in rest:  # an "@" past the authority: a password holding an unescaped "/", "?" or "#"
            userinfo, _, tail = rest.rpartition("@")
            rest = _without_password(userinfo, hidden) + "@" + tail

    def hide(match: re.Match[str]) -> str:
        hidden.append(match.group(2))
        return match.group(1) + "***"

    return scheme + sep + _SECRET_PARAMETER.sub(hide, rest), [h for h in hidden if h]


def _without_password(userinfo: str, hidden: list[str]) -> str:
    """``user:password`` -> ``user:***`` (the password goes to ``hidden``); a user name alone stays."""
    user, colon, password = userinfo.partition(":")
    if not colon and not any(c in userinfo for c in "/?#"):
        return userinfo  # a user name is not a secret
    if any(c in user for c in "/?#"):  # no user name in there, only a mangled password
        hidden.append(userinfo)
        return "***"
    hidden.append(password)
    return f"{user}:***"


def _scrub(message: str, url: str) -> str:
    """``message`` (redis-py's or urllib's, about ``url``) without any piece of ``url``'s secrets.

    A badly escaped password is cut apart by the URL parser, whose errors may quote a piece of
    it (``Port could not be cast to integer value as 'hun'``).
    """
    _, hidden = _redact(url)
    message = _redact(message)[0] if "://" in message else message
    pieces = {piece for secret in hidden for piece in (secret, *re.split(r"[/?#@:]", secret)) if piece}
    for piece in sorted(pieces, key=len, reverse=True):
        message = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", "***", message)
    return message
