"""``rtq.local_worker``: a worker process on this machine, tied to the process that starts it.

It is the "no GPU box yet" half of the one-machine path: ``rtq.connect()`` with nothing
configured starts an embedded server, and ``rtq.local_worker(q, "default")`` starts an
``rtq worker`` for it, so a notebook works before any remote machine exists. ``%rtq connect``
uses it for the same purpose.

What this is NOT for: serving other machines or outliving the notebook. The worker stops when
:meth:`LocalWorker.stop` is called, when this interpreter exits, or (on Linux) when the thread
that started it dies with its process. Real workers are started with ``rtq worker`` on the
machines that run the work (see the README's "Workers on GPU machines").
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

from .backend.keys import check_name
from .backend.topology import SENTINEL_SCHEME, is_cluster, pool_of, topology_of
from .errors import ConfigurationError, RtqError

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["LocalWorker", "local_worker"]

START_TIMEOUT = 60.0
"""Seconds a local worker may take to come up (a cold Python start on a slow disk)."""


class LocalWorker:
    """A ``rtq worker`` child process started by :func:`local_worker`.

    Attributes:
        process: The ``subprocess.Popen`` of the worker.
        names: The queue names it serves.
        url: The Redis URL it serves (its password, if any, is in it: do not print it).
    """

    def __init__(self, process: subprocess.Popen[bytes], names: tuple[str, ...], url: str, log: IO[bytes]) -> None:
        self.process = process
        self.names = names
        self.url = url
        self._log = log

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited ({self.process.returncode})"
        return f"<rtq.LocalWorker pid {self.pid} on {', '.join(map(repr, self.names))} {state}>"

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the worker process is still alive."""
        return self.process.poll() is None

    def log(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the worker printed (stdout and stderr together)."""
        try:
            self._log.flush()
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):  # the log was closed by stop()
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: SIGTERM lets running tasks finish within ``timeout`` s, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_worker(
    queue: RedisTaskQueue,
    *names: str,
    url: str | None = None,
    workers: int = 4,
    timeout: float = START_TIMEOUT,
) -> LocalWorker:
    """Start an ``rtq worker`` process on this machine for ``queue``, and wait until it serves.

    The worker serves the queue names ``names`` (default: ``"default"``) on the same Redis,
    prefix, suffix and secret as ``queue``, runs up to ``workers`` tasks at once, and stops when
    this Python process exits (or when :meth:`LocalWorker.stop` is called).

    Example::

        q = rtq.connect()                       # RTQ_REDIS_URL, else an embedded server
        if not q.is_listened("default"):        # nobody serves it yet: start a worker here
            worker = rtq.local_worker(q, "default")

    Args:
        queue: The queue whose Redis and namespace the worker serves (from :func:`rtq.connect`).
        *names: Queue names to serve.
        url: Redis URL for the worker (default: built from ``queue``'s client, one node's for a
            Redis Cluster client, a ``redis+sentinel://`` one for a Sentinel-managed client; pass
            it for a client made with TLS options, sentinel passwords or other settings a URL
            cannot carry). The worker gets it in its environment (``RTQ_REDIS_URL``), never on
            its command line; on a cluster it runs with ``--cluster``.
        workers: Tasks the worker runs at once.
        timeout: Seconds to wait for the worker to come up.

    Returns:
        A :class:`LocalWorker` handle (``pid``, ``running``, ``log()``, ``stop()``; a context manager).

    Raises:
        ConfigurationError: A name is invalid, or the queue's secret cannot be handed to a process.
        RtqError: The worker exited or did not serve within ``timeout``; the message holds its output.
    """
    names = names or ("default",)
    for name in names:
        try:
            check_name("queue name", name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    if workers < 1:
        raise ConfigurationError(f"workers must be at least 1, not {workers!r}")
    url = url or url_of(queue.redis)
    # The URL (it may hold a password) and the secret go through the environment, which only
    # this user can read (/proc/<pid>/environ); every user can read a command line.
    env = {**os.environ, "RTQ_REDIS_URL": url, "RTQ_SECRET": _secret_env(queue)}
    if not env["RTQ_SECRET"]:
        del env["RTQ_SECRET"]
    cmd = [sys.executable, "-m", "rtq", "worker", *names, "--prefix", queue.prefix]
    cmd += ["--suffix", queue.suffix, "--workers", str(workers), "--timeout", str(queue.timeout)]
    if is_cluster(queue.redis):
        cmd.append("--cluster")  # the URL is one node's: the worker discovers the others from it
    from .server import die_with_parent

    log = tempfile.TemporaryFile(prefix="rtq-worker-")
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        # Its own session: a Jupyter interrupt signals the kernel's whole process group, and
        # SIGINT would stop the worker; interrupting a cell stops only that cell's task.
        start_new_session=True,
    )
    handle = LocalWorker(proc, tuple(names), url, log)
    atexit.register(handle.stop)
    deadline = time.monotonic() + timeout
    # Another process is coming up: there is nothing to block on but its heartbeat record.
    while not _serving(queue, proc.pid):
        if proc.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            raise RtqError(f"the local worker (pid {proc.pid}) did not start:\n{handle.log(2000)}")
        time.sleep(0.05)
    return handle


def _serving(queue: RedisTaskQueue, pid: int) -> bool:
    """Whether a live worker record of process ``pid`` on this host exists (it serves from then on)."""
    host = socket.gethostname()
    return any(r.get("pid") == pid and r.get("host") == host for r in queue.live_workers())


def _secret_env(queue: RedisTaskQueue) -> str:
    """The queue's secrets as ``RTQ_SECRET`` spells them (``new,old``); empty when unsigned."""
    parts = []
    for secret in queue.serializer.secrets:
        try:
            value = secret.decode()
        except UnicodeDecodeError:
            value = ""
        if not value or "," in value or "\0" in value:
            raise ConfigurationError(
                "the queue's secret cannot be passed to a worker process in RTQ_SECRET "
                "(it is not text, or holds a comma): start the worker yourself with rtq worker"
            )
        parts.append(value)
    return ",".join(parts)


def url_of(client: Any) -> str:
    """A URL for the server a redis-py client talks to: ``redis://`` (or ``rediss://``, ``unix://``).

    A Redis Cluster client's is one node's (a worker started with ``--cluster`` finds the others
    from it); a Sentinel-managed client's is ``redis+sentinel://`` with its sentinels and service.
    """
    pool = pool_of(client)
    kwargs = pool.connection_kwargs
    user, password = kwargs.get("username"), kwargs.get("password")
    auth = ""
    if password:
        auth = f"{quote(str(user or ''), safe='')}:{quote(str(password), safe='')}@"
    elif user:
        auth = f"{quote(str(user), safe='')}@"
    db = kwargs.get("db", 0) or 0
    topology = topology_of(client)
    if topology and topology[0] == "sentinel":
        hosts = ",".join(f"{_host(host)}:{port}" for host, port in topology[1])
        return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(topology[2], safe='')}/{db}"
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if "SSL" in pool.connection_class.__name__ else "redis"
    return f"{scheme}://{auth}{_host(kwargs.get('host', 'localhost'))}:{kwargs.get('port', 6379)}/{db}"


def _host(host: str) -> str:
    """``host`` as a URL spells it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host
