"""Error replies: finding Redis's refusal for lack of memory among replies, and raising it as ``RedisFull``.

A pipeline or an EXEC answers with a list in which any reply may be an error; these helpers
look through it (EXEC's nested list included) so a caller raises the error that matters — the
``OOM`` refusal, as :class:`~rtq.errors.RedisFull` naming what was refused — rather than the
first one found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis as redis_py

from ..errors import RedisFull

__all__ = ["out_of_memory", "raise_errors", "server_message"]


def out_of_memory(replies: Sequence[Any]) -> redis_py.ResponseError | None:
    """Redis's refusal for lack of memory among ``replies`` (or inside an EXEC's reply), if any."""
    for reply in replies:
        found = out_of_memory(reply) if isinstance(reply, list) else reply
        if isinstance(found, redis_py.exceptions.OutOfMemoryError) or (
            isinstance(found, redis_py.ResponseError) and str(found).startswith("OOM ")
        ):
            return found
    return None


def server_message(error: redis_py.ResponseError) -> str:
    """An error reply as the server sent it (redis-py's own parser drops an ``OOM`` code)."""
    message = str(error)
    if isinstance(error, redis_py.exceptions.OutOfMemoryError) and not message.startswith("OOM "):
        return f"OOM {message}"
    return message


def raise_errors(replies: Sequence[Any], what: str) -> None:
    """Raise the first error among ``replies``: :class:`RedisFull` when Redis refused ``what`` for lack of memory."""
    refused = out_of_memory(replies)
    if refused is not None:
        raise RedisFull(
            f"Redis refused {what} for lack of memory: {server_message(refused)} "
            "(free memory in Redis or raise its maxmemory)"
        ) from refused
    for reply in replies:
        if isinstance(reply, list):  # an EXEC's replies
            raise_errors(reply, what)
        elif isinstance(reply, Exception):
            raise reply
