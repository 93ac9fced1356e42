"""The ``rtq`` command: ``rtq demo``, ``rtq worker``, ``rtq status``, ``rtq server``, ``rtq dashboard``."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (or ``module.function``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise SystemExit(f"rtq: --task-fn must look like module:function, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"rtq: cannot load --task-fn {spec!r}: {exc}") from exc
    if not callable(obj):
        raise SystemExit(f"rtq: --task-fn {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _whole(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {text!r}")
        return value

    return parse


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text: str) -> int:
    """An argparse type: a number of bytes, 0 or more, with an optional K, M, G or T (powers of 1024)."""
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1:] if number[-1:] in _UNITS else ""
    try:
        value = float(number[: len(number) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of bytes such as 2G or 512M, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of bytes, 0 or more, not {text!r}")
    return int(value)


def _seconds(*, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds above zero (or at least zero)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            least = "zero or more" if allow_zero else "above zero"
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {least}, not {text!r}")
        return value

    return parse


def _key_part(kind: str, *, glob: bool = False) -> Callable[[str], str]:
    """An argparse type: a queue name, prefix or suffix that can be part of a key."""

    def parse(text: str) -> str:
        from .backend.keys import check_name
        from .validate import check_no_glob

        try:
            check_name(kind, text)
            if glob:
                check_no_glob(kind, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


def _port(text: str, least: int = 1) -> int:
    value = _whole(least)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtq", description="Run notebook work on remote workers through Redis.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a demo on an embedded server with local workers")
    demo.add_argument("--tasks", type=_whole(0), default=0, help="run only the first N jobs (default: all)")
    demo.add_argument("--workers", type=_whole(1), default=2, help="worker processes to start (default 2)")

    worker = sub.add_parser("worker", help="serve one or more queues")
    worker.add_argument("names", nargs="+", type=_key_part("queue name"), metavar="NAME", help="queue names to serve")
    worker.add_argument("--url", help="Redis URL (default: RTQ_REDIS_URL)")
    worker.add_argument(
        "--prefix", default="rtq", type=_key_part("prefix", glob=True), help="key prefix (default: rtq)"
    )
    worker.add_argument(
        "--suffix", default="task-queue", type=_key_part("suffix", glob=True), help="key suffix (default: task-queue)"
    )
    worker.add_argument("--workers", type=_whole(1), default=4, help="tasks run at once (default 4)")
    worker.add_argument("--timeout", type=_seconds(), default=300, help="queue timeout in seconds (default 300)")
    worker.add_argument("--interval", type=_seconds(), default=1.0, help="longest blocking wait in seconds (default 1)")
    worker.add_argument("--task-fn", help="module:function to run plain seed tasks (default: shipped calls)")
    worker.add_argument(
        "--grace",
        type=_seconds(allow_zero=True),
        default=30.0,
        help="seconds running tasks get on SIGTERM (default 30)",
    )
    worker.add_argument("--lease", type=_seconds(), default=10.0, help="heartbeat lease in seconds (default 10)")
    worker.add_argument(
        "--max-attempts", type=_whole(1), default=3, help="claims before a task this worker reaps fails (default 3)"
    )
    worker.add_argument(
        "--max-payload",
        type=_whole(1),
        default=None,
        metavar="BYTES",
        help="largest payload a task may ship or return (default 400 MiB; set the same on clients)",
    )
    worker.add_argument(
        "--insecure",
        action="store_true",
        help="serve a Redis on another machine without RTQ_SECRET (tasks are pickles)",
    )
    worker.add_argument(
        "--gpus", help="one worker process per GPU: 'all' or indices like 0,1 (sets CUDA_VISIBLE_DEVICES)"
    )
    worker.add_argument("--cluster", action="store_true", help="--url is a node of a Redis Cluster")
    worker.add_argument(
        "--durable", action="store_true", help="wait for a replica to acknowledge each outcome (Redis WAIT)"
    )
    worker.add_argument(
        "--sessions",
        type=_whole(0),
        default=4,
        metavar="N",
        help="sessions and actors this worker holds at once (default 4; 0: none)",
    )
    worker.add_argument(
        "--session-idle",
        type=_seconds(),
        default=7200.0,
        metavar="SECONDS",
        help="close a session unused this long (default 7200: two hours)",
    )
    worker.add_argument(
        "--cache-bytes",
        type=_bytes,
        default=None,
        metavar="SIZE",
        help="keep big buffers (arrays) read by digest in memory up to SIZE, e.g. 2G; 0 turns it off "
        "(default: a quarter of this machine's memory, at most 4G)",
    )
    worker.add_argument("-v", "--verbose", action="store_true", help="log every task")

    server = sub.add_parser("server", help="run the embedded server in the foreground (for a machine without Redis)")
    server.add_argument("--port", type=_port, default=None, help="TCP port on 127.0.0.1 (default: a free one)")
    server.add_argument(
        "--url-file",
        metavar="FILE",
        help="write the URL (it holds the server's password) to FILE, readable by you alone, "
        "and print it without the password",
    )

    status = sub.add_parser("status", help="show workers, queues and running tasks")
    status.add_argument("--url", help="Redis URL (default: RTQ_REDIS_URL)")
    status.add_argument("--prefix", default="rtq", type=_key_part("prefix", glob=True))
    status.add_argument("--suffix", default="task-queue", type=_key_part("suffix", glob=True))
    status.add_argument("--cluster", action="store_true", help="--url is a node of a Redis Cluster")

    board = sub.add_parser("dashboard", help="serve a live web page of workers, GPUs, queues and tasks")
    board.add_argument("--url", help="Redis URL (default: RTQ_REDIS_URL)")
    board.add_argument("--prefix", default="rtq", type=_key_part("prefix", glob=True))
    board.add_argument("--suffix", default="task-queue", type=_key_part("suffix", glob=True))
    board.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    board.add_argument(
        "--port", type=lambda text: _port(text, 0), default=8789, help="TCP port (default 8789; 0: a free one)"
    )
    board.add_argument(
        "--refresh", type=_seconds(), default=1.0, help="seconds between reads of Redis while a page is open"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.command == "worker":
        return worker_main(args)
    if args.command == "status":
        return status_main(args)
    if args.command == "server":
        return server_main(args)
    if args.command == "dashboard":
        return dashboard_main(args)
    from .demo import run_demo

    return run_demo(tasks=args.tasks, workers=args.workers)


def _without_gpus(argv: list[str]) -> list[str]:
    """The worker's own arguments minus ``--gpus``, for its per-GPU children."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def _url_or_exit(url: str | None, what: str) -> str:
    url = url or os.environ.get("RTQ_REDIS_URL")
    if not url:
        print(f"rtq {what}: no Redis configured: pass --url redis://HOST:PORT or set RTQ_REDIS_URL", file=sys.stderr)
        raise SystemExit(2)
    return url


def worker_main(args: argparse.Namespace) -> int:
    from .backend.connections import RedisError
    from .calls import run_call
    from .connection import connect, is_local_url, redact_url
    from .errors import ConfigurationError, RtqError
    from .serialization import env_secret

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    url = _url_or_exit(args.url, "worker")
    try:
        env_secret()  # every flag was checked by the parser; this is the one setting it cannot see
    except ConfigurationError as exc:
        print(f"rtq worker: {exc}", file=sys.stderr)
        return 2
    if args.gpus is not None:
        from .worker.gpus import parse_gpus, supervise

        try:
            gpus = parse_gpus(args.gpus)
        except ValueError as exc:
            print(f"rtq worker: {exc}", file=sys.stderr)
            return 2
        return supervise(_without_gpus(args.argv[1:]), gpus)
    task_fn = load_function(args.task_fn) if args.task_fn else run_call
    try:
        queue = connect(
            url,
            args.prefix,
            suffix=args.suffix,
            timeout=args.timeout,
            interval=args.interval,
            task_fn=task_fn,
            max_attempts=args.max_attempts,
            cluster=args.cluster,
            durable=args.durable,
            **({"max_payload": args.max_payload} if args.max_payload is not None else {}),
        )
    except RtqError as exc:
        print(f"rtq worker: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
    # Every task's params are a pickle, whatever the task_fn: unpickling one runs code.
    if not queue.signed and not args.insecure and not is_local_url(url):
        print(
            f"rtq worker: refusing to serve {redact_url(url)} without a secret: that Redis is not on "
            "this machine, and tasks are pickles, so anyone who can write to it could run code "
            "here. Set RTQ_SECRET (the same value on clients and workers) to sign and verify "
            "every payload, or pass --insecure if you trust everyone who can reach that Redis.",
            file=sys.stderr,
        )
        return 2
    from .closures import runtime_versions
    from .worker.gpus import visible_gpus

    info = {**runtime_versions(), "gpus": visible_gpus()}
    listener = queue.listener(
        list(args.names),
        workers=args.workers,
        lease=args.lease,
        grace=args.grace,
        info=info,
        sessions=args.sessions,
        session_idle=args.session_idle,
        cache_bytes=args.cache_bytes,
    )

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        logging.getLogger("rtq.worker").warning("%s: finishing running tasks, then exiting", name)
        listener.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"rtq worker {listener.id} serving {', '.join(args.names)} with {args.workers} slot(s)", flush=True)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            listener.run()
        except BaseException as exc:  # reported below: the exit status must say the worker failed
            failed.append(exc)

    runner = threading.Thread(target=serve, name="rtq-listener")
    runner.start()
    while runner.is_alive():  # the main thread stays free to take signals
        runner.join(0.5)
    if failed:
        # A supervisor (systemd's Restart=on-failure, Kubernetes) restarts a worker that exits non-zero.
        error = failed[0]
        if isinstance(error, (RtqError, RedisError)):
            print(f"rtq worker: stopped serving: {type(error).__name__}: {error}", file=sys.stderr)
        else:  # not the user's doing: the traceback is for the bug report
            logging.getLogger("rtq.worker").error("stopped serving", exc_info=error)
        return 1
    if listener.abandoned:
        # Tasks stuck in a C call ignored the stop after the grace period; they were requeued,
        # and waiting for them would keep this process alive: leave now, with a clean status.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def status_main(args: argparse.Namespace) -> int:
    from .connection import connect
    from .errors import ConfigurationError, RtqError
    from .status import format_status, gather_status

    url = _url_or_exit(args.url, "status")
    try:
        queue = connect(url, args.prefix, suffix=args.suffix, cluster=args.cluster)
        print(format_status(gather_status(queue)))
    except RtqError as exc:
        print(f"rtq status: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
    return 0


def dashboard_main(args: argparse.Namespace) -> int:
    """Serve the dashboard until SIGTERM/SIGINT; prints its URL (with its access token) first."""
    from .connection import connect, redact_url
    from .errors import ConfigurationError, RtqError
    from .web import Board, DashboardServer

    url = _url_or_exit(args.url, "dashboard")
    try:
        queue = connect(url, args.prefix, suffix=args.suffix)
        where = redact_url(url)
        server = DashboardServer(Board(queue, where), host=args.host, port=args.port, refresh=args.refresh)
    except RtqError as exc:
        print(f"rtq dashboard: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
    if not _loopback(args.host):
        print(
            f"rtq dashboard: WARNING: listening on {args.host}, not on this machine's loopback: anyone who "
            "can reach this port and learns the URL's token sees what your workers run, their output and "
            "their errors (over plain HTTP). Prefer the default 127.0.0.1 and an SSH tunnel "
            f"(ssh -L {args.port}:127.0.0.1:{args.port} HOST).",
            file=sys.stderr,
            flush=True,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"rtq dashboard of {where} prefix {args.prefix!r}: {server.url}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_main(args: argparse.Namespace) -> int:
    """Run the embedded server until SIGTERM/SIGINT; prints (or writes) its URL first."""
    from .connection import redact_url
    from .errors import RtqError
    from .server import EmbeddedServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server = EmbeddedServer(port=args.port).start()
    except RtqError as exc:
        print(f"rtq server: {exc}", file=sys.stderr)
        return 1
    url_file = Path(args.url_file).absolute() if args.url_file else None
    try:
        if url_file is not None:
            try:
                write_private(url_file, server.url + "\n")
            except OSError as exc:
                print(f"rtq server: cannot write --url-file {str(url_file)!r}: {exc}", file=sys.stderr)
                return 1
            print(f"rtq server: {redact_url(server.url)}  (the URL with its password is in {url_file})", flush=True)
        else:
            print(
                f"rtq server: {server.url}\n"
                f"  export RTQ_REDIS_URL={server.url}\n"
                "  (the URL holds this server's password: give it to workers and notebooks through "
                "RTQ_REDIS_URL, not on a command line, where other users of this machine can read it)",
                flush=True,
            )
        while not stop.wait(1.0) and server.running:
            pass
    finally:
        server.stop()
        if url_file is not None:
            url_file.unlink(missing_ok=True)  # a stopped server's URL would only mislead
    return 0


def write_private(path: Path, content: str) -> None:
    """Write ``content`` to ``path``, readable and writable by this user alone (mode 0600).

    The file is made under a new name and renamed over ``path``, so no other user ever sees it
    with looser permissions, or half written, and a link planted at ``path`` is replaced, not followed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
