"""The worker: claims tasks, runs them, reports what they do, and keeps its lease.

* :mod:`~rtq.worker.listener`: the claim-and-run loop behind ``RedisTaskQueue.listen`` and
  ``rtq worker``;
* :mod:`~rtq.worker.watchdog` and :mod:`~rtq.worker.heartbeat`: the lease, the queue markers,
  and a helper process that a task holding the GIL cannot starve;
* :mod:`~rtq.worker.recovery`: giving back the tasks of workers that died, dead letters;
* :mod:`~rtq.worker.outcome`: storing a task's result or exception, fenced by its claim;
* :mod:`~rtq.worker.capture` and :mod:`~rtq.worker.stopper`: a task's output, and stopping it;
* :mod:`~rtq.worker.gpus`: one worker process per GPU.

It talks to Redis only through :mod:`rtq.backend`. See ``docs/architecture.md``.
"""
