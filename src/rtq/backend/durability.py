"""Durable writes: a write counts as made once a replica holds it too (``WAIT 1 <ms>``).

Redis replicates asynchronously: a master acknowledges a write before any replica has it, and a
failover in between promotes a replica without it. With ``durable=True`` rtq sends ``WAIT``
right after each submit and each outcome, on the same connection and in the same round trip, so
the reply comes once one replica has every write of that connection so far. The price is the
replication round trip (``python benchmarks/run.py --sentinel`` measures it).

A submit no replica acknowledged in time raises :class:`~rtq.errors.NotReplicated` (the task
is stored on the master and may still run); an outcome no replica acknowledged is logged by the
worker, which cannot do better than having stored it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import NotReplicated

__all__ = ["ACK_TIMEOUT_S", "Ack"]

logger = logging.getLogger("rtq.worker")

ACK_TIMEOUT_S = 2.0
"""Longest a durable write waits for a replica's acknowledgement."""


class Ack:
    """The ``WAIT`` sent after durable writes, and what its reply means.

    Args:
        strict: Raise :class:`NotReplicated` when no replica acknowledged (submits); else log
            it (outcomes: the worker stored them and goes on).
        timeout: Seconds to wait for a replica.
    """

    def __init__(self, *, strict: bool, timeout: float = ACK_TIMEOUT_S) -> None:
        self.strict = strict
        self.timeout = timeout
        self.command: tuple[Any, ...] = ("WAIT", 1, int(timeout * 1000))

    def check(self, reply: Any, what: str) -> None:
        """Raise (or log) unless ``reply``, ``WAIT``'s, says a replica holds ``what``."""
        if isinstance(reply, Exception):
            raise reply
        if int(reply) >= 1:
            return
        message = (
            f"no replica acknowledged {what} within {self.timeout:g} s: it is on the master, and a failover "
            "now would lose it (durable=True needs a replica that keeps up)"
        )
        if self.strict:
            raise NotReplicated(message)
        logger.warning("%s", message)
