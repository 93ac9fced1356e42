"""The Celery app of the benchmarks: prefork workers, Redis broker and result backend.

Pickle serialization, so numpy arrays travel as they do through rtq, RQ and arq. The server
URL comes from ``BENCH_REDIS_URL`` (set by ``run.py`` for itself and the workers it starts).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bench-celery"

app = Celery("peer_celery", broker=URL, backend=URL)
app.conf.update(
    task_serializer="pickle",
    result_serializer="pickle",
    accept_content=["pickle"],
    result_accept_content=["pickle"],
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    # A benchmark never waits minutes for a server that went away.
    result_backend_transport_options={"retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}},
)


@app.task(name="bench.noop")
def noop(*args: Any) -> None:
    return None


@app.task(name="bench.echo")
def echo(value: Any) -> Any:
    return value
