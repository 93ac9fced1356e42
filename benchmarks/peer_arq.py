"""The arq worker settings of the benchmarks (``arq peer_arq.WorkerSettings``).

Poll delay 0.01 s (arq's default is 0.5 s); the server URL comes from ``BENCH_REDIS_URL``.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POLL_DELAY = 0.01


async def noop(ctx: dict[str, Any], *args: Any) -> None:
    return None


async def echo(ctx: dict[str, Any], value: Any) -> Any:
    return value


class WorkerSettings:
    functions = [noop, echo]
    redis_settings = RedisSettings.from_dsn(URL)
    poll_delay = POLL_DELAY
    max_jobs = 10
    job_timeout = 600
    keep_result = 600
