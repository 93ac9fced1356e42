"""``rtq.connect()``: one call from a URL (or nothing) to a ready :class:`RedisTaskQueue`."""

from __future__ import annotations

import inspect
import ipaddress
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis as redis_py

from .errors import ConfigurationError, RtqConnectionError
from .task_queue import RedisTaskQueue

__all__ = ["connect", "is_local_url", "redact_url", "resolve_url"]

_QUEUE_OPTIONS = set(inspect.signature(RedisTaskQueue).parameters) - {"redis", "prefix", "secret"}


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``RTQ_REDIS_URL``, else the URL of this process's embedded server."""
    if url:
        return url
    env = os.environ.get("RTQ_REDIS_URL")
    if env:
        return env
    from .server import default_server

    return default_server().url


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at a loopback address or a unix socket."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    host = (parts.hostname or "").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def connect(
    url: str | None = None,
    prefix: str = "rtq",
    *,
    secret: str | bytes | Sequence[str | bytes] | None = None,
    **options: Any,
) -> RedisTaskQueue:
    """Connect to Redis and return a queue.

    Args:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://…`` (TLS) or
            ``unix:///path.sock``. Default: ``RTQ_REDIS_URL``, else an embedded server that
            this process starts (``pip install "rtq[server]"``).
        prefix: First part of every key; queues with different prefixes never meet.
        secret: Sign payloads (default: ``RTQ_SECRET``). See :class:`RedisTaskQueue`.
        **options: ``RedisTaskQueue`` options (``suffix``, ``timeout``, ``interval``,
            ``task_fn``, ``max_payload``, ``max_attempts``); anything else goes to
            ``redis.Redis.from_url`` (e.g. ``socket_timeout``, ``ssl_ca_certs``).

    Raises:
        RtqConnectionError: Redis does not answer at ``url``.
        ConfigurationError: ``url`` is malformed.
    """
    queue_kwargs = {k: options.pop(k) for k in list(options) if k in _QUEUE_OPTIONS}
    resolved = resolve_url(url)
    try:
        client = redis_py.Redis.from_url(resolved, **options)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {resolved!r}: {exc}") from exc
    try:
        client.ping()
    except redis_py.RedisError as exc:
        raise RtqConnectionError(f"cannot reach Redis at {redact_url(resolved)}: {exc}") from exc
    return RedisTaskQueue(client, prefix, secret=secret, **queue_kwargs)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
