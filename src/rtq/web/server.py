"""The dashboard's web server: Tornado, in a thread of its own, pushing the board to pages as it changes.

Routes (every one but the shipped static files needs the access token, ``?token=…`` or an
``Authorization: token …`` header; without it: 403):

==================  =========================================================================
``/``               the page (``static/index.html``), which opens the event stream
``/events``         server-sent events: the board as JSON, sent when it changed
``/api/state``      the board now, as JSON (for scripts)
``/api/error?id=``  a failed task's error text and remote traceback, read when the page asks
``/static/…``       the page's CSS and JavaScript, shipped in the package (no data in them)
==================  =========================================================================

Everything is read-only: only GET is routed. Redis is read by one thread (the board is not
shared between threads), only while at least one page is connected, once per ``refresh``.

Why Tornado: Jupyter (ipykernel, jupyter-server) already installs it, so notebook users need
nothing new, and it serves streaming responses (server-sent events) with no framework around it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..backend.connections import RedisError
from ..errors import DashboardError
from .board import Board

__all__ = ["DashboardServer", "import_tornado"]

logger = logging.getLogger("rtq.web")

STATIC = Path(__file__).with_name("static")
KEEPALIVE_S = 15.0
"""Seconds between two comments on an idle event stream (proxies close silent connections)."""


def import_tornado() -> Any:
    """The ``tornado`` package, or a :class:`DashboardError` that says how to install it."""
    try:
        import tornado.web
    except ImportError:
        raise DashboardError(
            "the dashboard needs Tornado (Jupyter installs it): pip install 'rtq[dashboard]'"
        ) from None
    return tornado


class _Hub:
    """The event loop's side: who is connected, and the board's last JSON they were sent."""

    def __init__(self, read: Callable[[], str], refresh: float) -> None:
        self.read = read
        self.refresh = refresh
        self.inboxes: set[asyncio.Queue[str | None]] = set()
        self.latest: str | None = None
        self.poller: asyncio.Task[None] | None = None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="rtq-dashboard-read")

    def subscribe(self) -> asyncio.Queue[str | None]:
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        if self.latest is not None:
            inbox.put_nowait(_message(self.latest))
        self.inboxes.add(inbox)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        return inbox

    def unsubscribe(self, inbox: asyncio.Queue[str | None]) -> None:
        self.inboxes.discard(inbox)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the one thread that reads Redis."""
        return await asyncio.get_running_loop().run_in_executor(self.reader, fn, *args)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while self.inboxes:
            payload = await self.run(self.read)
            if payload != self.latest:
                self.latest, quiet_since = payload, loop.time()
                self._send(payload)
            elif loop.time() - quiet_since > KEEPALIVE_S:
                quiet_since = loop.time()
                self._send(None, comment=True)
            await asyncio.sleep(self.refresh)  # the refresh rate: Redis is polled, the page is pushed to
        self.latest = None  # nobody watches: the next page gets a fresh read

    def _send(self, payload: str | None, *, comment: bool = False) -> None:
        message = ": keepalive\n\n" if comment or payload is None else _message(payload)
        for inbox in list(self.inboxes):
            inbox.put_nowait(message)

    def close(self) -> None:
        for inbox in list(self.inboxes):
            inbox.put_nowait(None)
        self.reader.shutdown(wait=False, cancel_futures=True)


def _message(board: str) -> str:
    """One event: the board, and the time it is sent (the page counts ages from it)."""
    return f'data: {{"now":{time.time()!r},"board":{board}}}\n\n'


class DashboardServer:
    """Serves one board's page on ``host:port`` from a background thread.

    Args:
        board: What the page shows.
        host: The address to bind (default loopback).
        port: The TCP port (0: a free one).
        refresh: Seconds between two reads of Redis while a page is open.
        token: The access token (default: a new random one).

    Raises:
        DashboardError: Tornado is missing, or the address cannot be bound.
    """

    def __init__(
        self, board: Board, *, host: str = "127.0.0.1", port: int = 0, refresh: float = 1.0, token: str | None = None
    ) -> None:
        self.tornado = import_tornado()
        import tornado.netutil

        self.board = board
        self.host = host
        self.refresh = refresh
        self.token = token or secrets.token_urlsafe(24)
        try:
            self.sockets = tornado.netutil.bind_sockets(port, host)
        except (OSError, socket.gaierror) as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = int(self.sockets[0].getsockname()[1])
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: _Hub | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """The page's URL, with its token."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/?token={self.token}"

    def start(self) -> DashboardServer:
        """Start serving in a daemon thread (it ends with the process, or :meth:`stop`)."""
        self.thread = threading.Thread(target=self._serve, name="rtq-dashboard", daemon=True)
        self.thread.start()
        self._ready.wait(30)
        return self

    def _serve(self) -> None:
        import tornado.httpserver

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self.hub = _Hub(self._read, self.refresh)
        server = tornado.httpserver.HTTPServer(_app(self), xheaders=False)
        server.add_sockets(self.sockets)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.stop()
            self.hub.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _read(self) -> str:
        """The board as JSON (run on the reading thread)."""
        try:
            self.board.refresh()
            state = self.board.state()
        except RedisError as exc:
            state = {"where": self.board.where, "prefix": self.board.prefix, "error": f"cannot read Redis: {exc}"}
        return json.dumps(state, separators=(",", ":"))

    def stop(self) -> None:
        """Stop serving and close the port."""
        loop, thread = self.loop, self.thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def allowed(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.token.encode())


def _app(server: DashboardServer) -> Any:
    """The Tornado application of ``server``."""
    import tornado.iostream
    import tornado.web

    class Guarded(tornado.web.RequestHandler):
        """Every data route: the token or 403, and headers that keep the page to itself."""

        def set_default_headers(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.set_header("Referrer-Policy", "no-referrer")
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Content-Security-Policy", "default-src 'self'; base-uri 'none'; form-action 'none'")

        def prepare(self) -> None:
            given = self.get_query_argument("token", "")
            header = self.request.headers.get("Authorization", "")
            if header.startswith("token "):
                given = header[len("token ") :]
            if not given or not server.allowed(given):
                raise tornado.web.HTTPError(403)

        def write_error(self, status_code: int, **kwargs: Any) -> None:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            if status_code == 403:
                self.finish("403: this rtq dashboard needs the token of the URL it printed (?token=...)\n")
            else:
                self.finish(f"{status_code}: {self._reason}\n")

    class Page(Guarded):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish((STATIC / "index.html").read_bytes())

    class State(Guarded):
        async def get(self) -> None:
            assert server.hub is not None
            self.set_header("Content-Type", "application/json")
            self.finish(await server.hub.run(server._read))

    class Error(Guarded):
        async def get(self) -> None:
            assert server.hub is not None
            task_id = self.get_query_argument("id", "")
            try:
                info = await server.hub.run(server.board.error, task_id) if task_id else {}
            except RedisError as exc:
                info = {"unavailable": f"cannot read Redis: {exc}"}
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(info))

    class Events(Guarded):
        inbox: asyncio.Queue[str | None] | None = None

        async def get(self) -> None:
            assert server.hub is not None
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("X-Accel-Buffering", "no")  # nginx in front: do not buffer the stream
            self.inbox = inbox = server.hub.subscribe()
            try:
                self.write("retry: 2000\n\n")
                await self.flush()
                while (message := await inbox.get()) is not None:
                    self.write(message)
                    await self.flush()
            except tornado.iostream.StreamClosedError:
                pass
            finally:
                server.hub.unsubscribe(inbox)

        def on_connection_close(self) -> None:
            if self.inbox is not None:
                self.inbox.put_nowait(None)

    class Static(tornado.web.StaticFileHandler):
        def set_default_headers(self) -> None:
            self.set_header("X-Content-Type-Options", "nosniff")

    return tornado.web.Application(
        [
            (r"/", Page),
            (r"/events", Events),
            (r"/api/state", State),
            (r"/api/error", Error),
            (r"/static/(.*)", Static, {"path": str(STATIC)}),
        ],
        compress_response=False,
        log_function=_log,
    )


def _log(handler: Any) -> None:
    """Requests are logged at debug level only: a URL carries the token."""
    logger.debug("%s %s %s", handler.get_status(), handler.request.method, handler.request.path)
