"""A worker's heartbeat helper: a small separate process that task code cannot starve.

A task that holds the GIL in C code (a long numpy call, a C extension loop) freezes every thread
of its worker, the in-process heartbeat thread included; with only that thread, such a worker
would look dead after one lease and its task would be run a second time elsewhere. So each
listener also starts this helper process, which refreshes the worker's
lease, its ``workers`` score and the listener markers on its own clock, as long as the worker
process is alive and not stopped:

* parent stopped (SIGSTOP, state ``T`` in ``/proc/<pid>/stat``): the helper skips its beats, so
  the lease lapses and the worker's tasks are requeued — a frozen worker must not hold tasks, and
  fencing then discards whatever it produces when it resumes;
* parent gone (the control pipe hits EOF, or ``getppid()`` changes): the helper ends the lease at
  once (``heartbeat.lua`` ``dead``), so a crashed worker's tasks are requeued within one reaping
  period instead of one lease, then exits;
* Redis unreachable: it retries with backoff (never more than a third of the lease apart) and
  logs once per outage.

The parent talks to the helper over the helper's stdin: the first line carries the settings
(pickled, base64; never on the command line, where other users could read a password), then
``drain`` (keep the lease, stop marking queues as listened) and ``exit`` (stop beating, the
worker retires its own record).

What this is NOT: a watchdog for a task that hangs while holding no GIL. A live, running worker
keeps its lease however long its tasks take; deadlines (``expiry``) and cancellation stop those.
Without ``/proc`` (macOS, Windows) a stopped parent cannot be told from a busy one, so only the
death of the parent ends the lease early.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backend.connections import RedisError, connection_settings, helper_client
from ..backend.keys import Keys
from ..backend.topology import topology_of
from ..backend.workers import LeaseKeeper
from ..backoff import Backoff

if TYPE_CHECKING:
    from .state import WorkerState

logger = logging.getLogger("rtq.worker.heartbeat")

__all__ = ["HeartbeatConfig", "HeartbeatHelper", "parent_state"]

_EOF = "<eof>"
# Run through an import (not ``-m``), so the pickled settings name the very module that runs.
_ENTRY = "import sys; from rtq.worker.heartbeat import main; sys.exit(main())"


@dataclass
class HeartbeatConfig:
    """What the helper needs to beat for one worker (sent to it pickled, through its stdin)."""

    connection_class: type
    connection_kwargs: dict[str, Any]
    prefix: str
    suffix: str
    worker_id: str
    names: list[str]
    lease: float
    marker_ttl: float
    period: float
    parent_pid: int
    record: dict[str, Any] = field(default_factory=dict)
    topology: tuple[Any, ...] = ()  # a cluster's nodes or the sentinels (see rtq.backend.topology)


@dataclass(frozen=True)
class HelperSettings:
    """How a worker's helper reaches its Redis: plain connection settings and the key namespace."""

    connection_class: type
    connection_kwargs: dict[str, Any]
    prefix: str
    suffix: str
    topology: tuple[Any, ...] = ()

    @classmethod
    def of(cls, client: Any, keys: Keys) -> HelperSettings:
        """The settings that reach the same server as ``client`` (see :func:`connection_settings`)."""
        connection_class, connection_kwargs = connection_settings(client)
        return cls(connection_class, connection_kwargs, keys.prefix, keys.suffix, topology_of(client))

    def config(self, state: WorkerState, parent_pid: int) -> HeartbeatConfig:
        """What the helper of the worker ``state`` needs, now."""
        return HeartbeatConfig(
            connection_class=self.connection_class,
            connection_kwargs=self.connection_kwargs,
            prefix=self.prefix,
            suffix=self.suffix,
            worker_id=state.id,
            names=list(state.names),
            lease=state.lease,
            marker_ttl=state.marker_ttl,
            period=state.period,
            parent_pid=parent_pid,
            record=dict(state.info),
            topology=self.topology,
        )


def parent_state(pid: int) -> str | None:
    """The scheduler state letter of process ``pid`` (``R``, ``S``, ``T``, ``Z``…), or None.

    None means unknown: no ``/proc`` (not Linux) or the process is gone.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) sits in parentheses and may itself hold spaces or parentheses.
    rest = raw[raw.rfind(b")") + 2 :]
    return rest[:1].decode() or None


# -- parent side -------------------------------------------------------------------------------
class HeartbeatHelper:
    """Starts and commands the heartbeat helper process of one listener."""

    def __init__(self, config: HeartbeatConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.closed = False
        self.mode = "serve"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> bool:
        """Start the helper; returns False (and logs) when it cannot run here."""
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        payload = base64.b64encode(pickle.dumps(self.config)) + b"\n" + self.mode.encode() + b"\n"
        try:
            self.process = subprocess.Popen(
                # The trailing arguments only make the helper recognisable in ps/top.
                [sys.executable, "-c", _ENTRY, "rtq-heartbeat", self.config.worker_id],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
            assert self.process.stdin is not None
            self.process.stdin.write(payload)
            self.process.stdin.flush()
        except Exception as exc:
            logger.warning(
                "cannot start the heartbeat helper (%s): a task holding the GIL may now make this worker look dead",
                exc,
            )
            self.process = None
            return False
        return True

    def ensure(self) -> None:
        """Restart the helper if it died while the listener still runs."""
        if self.closed or self.alive():
            return
        if self.process is not None:
            logger.warning("heartbeat helper exited (code %s); restarting it", self.process.returncode)
            self._close_pipe()
        self.start()

    def drain(self) -> None:
        """Keep the lease, but stop marking the queues as listened."""
        self.mode = "drain"
        self._send("drain")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helper (the listener then removes its own record)."""
        self.closed = True
        process = self.process
        if process is None:
            return
        self._send("exit")
        self._close_pipe()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _send(self, command: str) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.closed:
            return
        try:
            process.stdin.write(command.encode() + b"\n")
            process.stdin.flush()
        except (OSError, ValueError):  # the helper is gone; ensure() restarts it
            pass

    def _close_pipe(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass


# -- helper side -------------------------------------------------------------------------------
class _Beater:
    """The helper's loop: beat every ``period`` while the parent runs, end the lease when it dies."""

    def __init__(self, config: HeartbeatConfig) -> None:
        self.config = config
        # Short socket timeouts and no hidden retries: a beat that hangs is a beat that is late.
        timeout = max(0.5, min(config.lease / 3, 5.0))
        client = helper_client(config.connection_class, config.connection_kwargs, timeout, config.topology)
        self.keeper = LeaseKeeper(client, Keys(config.prefix, config.suffix), config.worker_id, config.names)
        self.record = {**config.record, "heartbeat_pid": os.getpid()}

    def beat(self, mode: str) -> None:
        self.keeper.beat(mode, self.config.lease, self.config.marker_ttl, self.record)

    def parent_gone(self) -> bool:
        return os.getppid() != self.config.parent_pid or parent_state(self.config.parent_pid) in ("Z", "X")

    def run(self, commands: queue.Queue[str]) -> None:
        c = self.config
        mode = "serve"
        # Never more than a third of the lease apart: once Redis is back, the lease must be too.
        backoff = Backoff(c.period, max(c.period, c.lease / 3), rest=c.period)
        next_beat = time.monotonic()
        while True:
            try:
                command = commands.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                command = ""
            if command == "exit":
                return
            if command in ("serve", "drain"):
                mode = command
                continue
            if command == _EOF or self.parent_gone():
                self.declare_dead()
                return
            next_beat = time.monotonic() + backoff.delay
            if parent_state(c.parent_pid) in ("T", "t"):
                continue  # stopped (SIGSTOP, a debugger): let the lease lapse on purpose
            try:
                self.beat(mode)
            except RedisError as exc:
                if not backoff.failing:
                    logger.warning("worker %s: heartbeat failed (%s); retrying with backoff", c.worker_id, exc)
                next_beat = time.monotonic() + backoff.failed()
                continue
            if backoff.failing:
                logger.warning("worker %s: heartbeat restored", c.worker_id)
            backoff.succeeded()

    def declare_dead(self) -> None:
        """End the dead parent's lease now, so its tasks are requeued without waiting it out."""
        deadline = time.monotonic() + min(self.config.lease, 3.0)
        while time.monotonic() < deadline:
            try:
                self.beat("dead")
                return
            except RedisError:
                time.sleep(min(self.config.period, 1.0))  # Redis away: the lease lapses anyway


class _Lines:
    """Lines from a raw file descriptor.

    Raw ``os.read`` rather than ``sys.stdin``: a daemon thread blocked inside the buffered
    reader holds its lock, and the interpreter then aborts at exit trying to take it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self) -> bytes:
        """The next line, without its newline; ``b""`` with ``eof`` set at the end."""
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                self.eof = True
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def _read_commands(lines: _Lines, commands: queue.Queue[str]) -> None:
    while not lines.eof:
        line = lines.readline().decode().strip()
        if line:
            commands.put(line)
    commands.put(_EOF)


def main() -> int:
    """Entry point of the helper process (started by a listener, not by people)."""
    # Ctrl-C and a group-wide SIGTERM are meant for the worker, which then drains its tasks:
    # the helper must keep the lease alive meanwhile, and it exits when the worker does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lines = _Lines(sys.stdin.fileno())
    line = lines.readline()
    if not line.strip():
        return 0
    config: HeartbeatConfig = pickle.loads(base64.b64decode(line))
    commands: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_commands, args=(lines, commands), daemon=True).start()
    _Beater(config).run(commands)
    return 0
