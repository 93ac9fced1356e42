"""The least a Redis queue can do: the floor of a task's round trip on this machine.

A worker process that moves an id from a queue list into its own list (BLMOVE, as rtq's workers
do), then pushes it onto the id's done list, where the caller blocks (BLPOP). No payload, no
record, no claim, no code: three hops between three processes (caller -> server -> worker ->
server -> caller), with plain redis-py. ``benchmarks/run.py`` measures it next to rtq's
``query()`` to show how much of a round trip is the hops themselves.

    python benchmarks/floor_worker.py URL QUEUE_KEY   # until it pops the id "stop"
"""

from __future__ import annotations

import sys

import redis


def main(url: str, queue: str) -> None:
    client = redis.Redis.from_url(url)
    mine = f"{queue}|running"
    while True:
        task_id = client.blmove(queue, mine, 1.0, "LEFT", "RIGHT")
        if task_id is None:
            continue
        if task_id == b"stop":
            client.lrem(mine, -1, task_id)
            return
        pipe = client.pipeline(transaction=False)
        pipe.rpush(f"{queue}|done:{task_id.decode()}", b"1")
        pipe.lrem(mine, -1, task_id)
        pipe.execute()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
