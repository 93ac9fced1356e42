"""Whether a Redis server may evict rtq's keys, and the one line that tells a worker's user so.

A server with a memory limit (``maxmemory``) and any ``maxmemory-policy`` but ``noeviction``
deletes keys when it runs out of memory: ``allkeys-*`` any key, ``volatile-*`` keys that have a
TTL, and rtq's task records, results and listener markers all have one. A queued task whose
record is evicted is lost (its caller gets ``TaskLost``); an evicted queue loses every id in it.
Under ``noeviction`` a full server refuses writes instead, which rtq reports as errors: nothing
vanishes. Without a limit (``maxmemory 0``) nothing is evicted.

What this is NOT: a guarantee. Managed services often refuse ``CONFIG`` (a renamed or disabled
command), and an ACL may refuse ``INFO`` too; then the settings are unknown and nothing is said.
"""

from __future__ import annotations

import logging
from typing import Any

import redis as redis_py

from .store import text

__all__ = ["eviction_warning", "memory_settings"]

logger = logging.getLogger("rtq.worker")

SAFE_POLICY = "noeviction"


def memory_settings(client: Any) -> tuple[int, str] | None:
    """The server's ``(maxmemory, maxmemory-policy)``, or None when it does not tell.

    ``INFO memory`` first (managed services that rename or disable ``CONFIG`` still answer it),
    else ``CONFIG GET``. A user whom an ACL denies ``INFO`` is denied ``CONFIG`` as well (both
    are ``@dangerous``), so a denial ends the look: it shows in the ACL log once, not twice.
    """
    try:
        info = client.info("memory")
        return int(info["maxmemory"]), text(info["maxmemory_policy"])
    except redis_py.exceptions.NoPermissionError as exc:
        logger.debug("INFO memory refused (%s): not checking eviction", exc)
        return None
    # A best-effort look at the server's settings: whatever goes wrong, the worker serves on.
    except Exception as exc:
        logger.debug("cannot read maxmemory with INFO memory (%s); trying CONFIG GET", exc)
    try:
        config = {text(k): text(v) for k, v in client.config_get("maxmemory*").items()}
        return int(config["maxmemory"]), config["maxmemory-policy"]
    except Exception as exc:
        logger.debug("cannot read maxmemory with CONFIG GET either (%s): not checking eviction", exc)
        return None


def eviction_warning(client: Any) -> str | None:
    """One line saying that ``client``'s server may evict rtq's keys, and how to stop it; or None."""
    settings = memory_settings(client)
    if settings is None:
        return None
    maxmemory, policy = settings
    if maxmemory <= 0 or policy == SAFE_POLICY:
        return None
    return (
        f"this Redis may evict rtq's keys: maxmemory is {maxmemory / 2**20:.1f} MiB with maxmemory-policy "
        f"{policy}, so when it fills up it deletes keys, and queued tasks, their records and results can "
        "vanish (volatile-* policies too: rtq's keys have TTLs). Fix: CONFIG SET maxmemory-policy noeviction "
        "(and set it in the server's config file), or give rtq a Redis of its own with that policy"
    )
