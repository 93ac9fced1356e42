"""The one package that speaks Redis: key names, task records, the wire, the Lua scripts.

Everything above it — the worker, the client API, the notebook and the CLI — asks it for task
operations and never spells a key, a hash field or a command itself (an import contract in
``pyproject.toml``, checked in CI, keeps it so). See ``docs/architecture.md``.

* :mod:`~rtq.backend.keys`: every key name, with a table of keys and their Redis types;
* :mod:`~rtq.backend.store`: task records and their payloads, and the task operations;
* :mod:`~rtq.backend.submits`: the submit path (a record stored and its id queued in one round trip);
* :mod:`~rtq.backend.failures`: a task's exception as text in its record (type, message, traceback);
* :mod:`~rtq.backend.wire`: held connections, and commands sent on them;
* :mod:`~rtq.backend.resp`: RESP packing and parsing (hiredis when installed);
* :mod:`~rtq.backend.replies`: error replies, and Redis's refusal for lack of memory as ``RedisFull``;
* :mod:`~rtq.backend.batching`: script calls of concurrent threads sharing one round trip;
* :mod:`~rtq.backend.scripts`: one Lua script per atomic operation, each with a KEYS/ARGV header.
"""
