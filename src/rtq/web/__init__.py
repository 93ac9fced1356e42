"""``rtq dashboard`` and ``rtq.dashboard()``: a live web page of workers, GPUs, queues and tasks.

* :mod:`rtq.web.board` — what the page shows, read from Redis through :mod:`rtq.backend.overview`;
* :mod:`rtq.web.server` — the Tornado server (token, read-only routes, server-sent events);
* ``static/`` — the page: plain HTML, CSS and JavaScript, no build step, nothing from a CDN.

In a notebook, :func:`dashboard` starts one in a background thread of the kernel, for the
connection ``%rtq connect`` made (else :func:`rtq.connect`'s default), and shows it in the cell.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import TYPE_CHECKING, Any

from .board import Board
from .server import DashboardServer

if TYPE_CHECKING:
    from ..task_queue import RedisTaskQueue

__all__ = ["Board", "DashboardServer", "dashboard"]

_running: dict[int, DashboardServer] = {}


def dashboard(
    queue: RedisTaskQueue | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    refresh: float = 1.0,
    link: str | None = None,
    show: bool = True,
) -> DashboardServer:
    """Start a live dashboard of ``queue``'s workers and tasks in the background, and show it.

    It serves until the process (the notebook's kernel) ends, or ``.stop()``. Calling it again
    for the same queue shows the running one.

    Args:
        queue: What to show (default: the ``%rtq connect`` connection of this kernel, else
            :func:`rtq.connect`'s default: ``RTQ_REDIS_URL`` or the embedded server).
        host: The address to bind; loopback unless you mean others to reach it.
        port: The TCP port (default: a free one).
        refresh: Seconds between two reads of Redis while a page is open.
        link: The URL shown in the cell, a template of ``{host}``, ``{port}`` and ``{token}``
            (default: ``RTQ_DASHBOARD_LINK``; on a JupyterHub, where the browser cannot reach
            the kernel's machine, the jupyter-server-proxy path
            ``{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/?token={token}``).
        show: Display a link and the page (an IFrame) in the cell.

    Returns:
        The server: ``.url`` (with its token), ``.port``, ``.stop()``.

    Raises:
        rtq.errors.DashboardError: Tornado is missing or the address cannot be bound.
    """
    where = None
    if queue is None:
        queue, where = _current_connection()
    server = _running.get(id(queue))
    if server is None or not (server.thread and server.thread.is_alive()):
        server = DashboardServer(Board(queue, where), host=host, port=port, refresh=refresh).start()
        _running[id(queue)] = server
        atexit.register(server.stop)
    if show:
        _show(server, link)
    return server


def link_of(server: DashboardServer, link: str | None = None) -> str:
    """The URL a browser opens: ``link``, ``RTQ_DASHBOARD_LINK``, the JupyterHub proxy path, or the server's own."""
    template = link or os.environ.get("RTQ_DASHBOARD_LINK")
    hub = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if not template and hub:
        template = hub.rstrip("/") + "/proxy/{port}/?token={token}"
    if not template:
        return server.url
    return template.format(host=server.host, port=server.port, token=server.token)


def _current_connection() -> tuple[Any, str | None]:
    """The queue of this kernel's ``%rtq connect`` (and its URL, redacted), else the default connection."""
    from ..connection import connect, redact_url, resolve_url

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    magics = shell.magics_manager.registry.get("RtqMagics") if shell is not None else None
    session = getattr(magics, "session", None)
    if session is not None:
        return session.queue, redact_url(session.url)
    url = resolve_url()
    queue = connect(url)
    return queue, redact_url(url)


def _show(server: DashboardServer, link: str | None) -> None:
    """A link and the page itself in the notebook's cell; the URL on a terminal."""
    url = link_of(server, link)
    ipython = sys.modules.get("IPython")
    if ipython is None or ipython.get_ipython() is None:  # type: ignore[attr-defined]
        print(f"rtq dashboard: {url}")
        return
    from html import escape

    from IPython.display import HTML, IFrame, display

    display(HTML(f'<a href="{escape(url)}" target="_blank">rtq dashboard</a> (opens in a new tab)'))
    display(IFrame(url, width="100%", height=640))
