"""What state that stays on the worker saves: session cells and actor calls, measured on real workers.

1. Session cell: a ``%%rtq --session`` cell reading a 1 GiB numpy array the session already
   holds, run 50 times through the magic's own run path (an IPython shell in this process, no
   browser: ``run_cell_magic``), against the same cell in a fresh namespace, which ships the
   array (at 256 MiB: a 1 GiB payload is over the default ``max_payload``): in full the first
   time, then as its digest (each worker process fetches it from Redis once, then from its cache).
2. Actor call round trip: ``actor.method().result()`` on an actor, next to ``query()`` of a
   no-op on the same queue.

Run by ``benchmarks/run.py`` (its rtq section), or alone:
``python benchmarks/sessions_bench.py [--url redis://...] [--cells 50] [--calls 300]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

GiB = 1 << 30
MiB = 1 << 20


class Pinger:
    """The actor: answers at once (what is measured is the call's own cost)."""

    def ping(self) -> None:
        return None


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def actor_round_trip(ex: Any, queue: Any, name: str, n: int) -> dict[str, float]:
    """Median milliseconds of an actor call and of ``query()``, alternating in rounds."""
    from rtq.calls import Call

    noop = Call(Pinger().ping)
    actor = ex.actor(Pinger)
    counter = iter(range(10**9))
    try:
        actor_ms: list[float] = []
        query_ms: list[float] = []
        for _ in range(10):
            actor_ms.append(_median_ms(lambda: actor.ping().result(30), max(1, n // 10)))
            query_ms.append(_median_ms(lambda: queue.query(f"sq-{next(counter)}", name, noop), max(1, n // 10)))
    finally:
        actor.close()
    return {"actor_ms": statistics.median(actor_ms), "query_ms": statistics.median(query_ms), "calls": n}


def session_cells(url: str, prefix: str, name: str, cells: int, fresh_cells: int = 5) -> dict[str, float]:
    """Milliseconds: a session cell using a held 1 GiB array (median), a fresh cell shipping 256 MiB
    (the first), and the same fresh cell again (median of ``fresh_cells``)."""
    import numpy as np
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        shell.run_line_magic("load_ext", "rtq")
        shell.run_line_magic("rtq", f"connect {url} --prefix {prefix} --queue {name}")
        session = f"bench{uuid.uuid4().hex[:6]}"
        line = f"{name} --session {session} --progress-after 1000"
        shell.run_cell_magic("rtq", line, f"import numpy as np\narr = np.ones({GiB}, dtype=np.uint8)")
        assert shell.run_cell_magic("rtq", line, "int(arr[-1])") == 1
        held = _median_ms(lambda: shell.run_cell_magic("rtq", line, "int(arr[-1])"), cells)
        shell.user_ns["arr"] = np.ones(256 * MiB, dtype=np.uint8)

        def fresh_cell() -> None:
            shell.run_cell_magic("rtq", f"{name} --progress-after 1000", "int(arr[-1])")

        first = _median_ms(fresh_cell, 1)
        fresh = _median_ms(fresh_cell, fresh_cells)
        shell.run_line_magic("rtq", f"session close {session}")
        del shell.user_ns["arr"]
    return {
        "held_ms": held,
        "cells": cells,
        "fresh_first_ms": first,
        "fresh_256mib_ms": fresh,
        "fresh_cells": fresh_cells,
    }


def measure(url: str, prefix: str, name: str, ex: Any, *, quick: bool = False) -> dict[str, Any]:
    """Both measures, on the workers already serving ``name`` (``benchmarks/run.py``'s)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # not installed: shipped as a notebook's code
    return {
        "actor": actor_round_trip(ex, ex.queue, name, 100 if quick else 300),
        "cells": session_cells(url, prefix, name, 20 if quick else 50, 3 if quick else 5),
    }


def render(result: dict[str, Any] | None) -> list[str]:
    """The rows for RESULTS.md / the README table."""
    if not result:
        return []
    c, a = result["cells"], result["actor"]
    return [
        "",
        "| sessions | median |",
        "|---|---|",
        f"| `%%rtq --session` cell using a 1 GiB array the session holds ({c['cells']} cells) | "
        f"{c['held_ms']:.2f} ms |",
        f"| the same cell in a fresh namespace, shipping a 256 MiB array (the first cell) | "
        f"{c['fresh_first_ms']:.0f} ms |",
        f"| that fresh cell again: the array travels as its digest ({c['fresh_cells']} cells; each worker "
        f"process fetches it once) | {c['fresh_256mib_ms']:.0f} ms |",
        f"| actor call round trip, `actor.ping().result()` ({a['calls']} calls) | {a['actor_ms']:.2f} ms |",
        f"| `query()` round trip of a no-op, same queue | {a['query_ms']:.2f} ms |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis URL (default: an embedded server)")
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import rtq
    from rtq.server import EmbeddedServer

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(EmbeddedServer()).url
        prefix, name = "bench-sessions", "sessions"
        worker = subprocess.Popen(
            [sys.executable, "-m", "rtq", "worker", name, "--url", url, "--prefix", prefix, "--interval", "0.5"],
            env={**os.environ},
        )
        stack.callback(worker.wait)
        stack.callback(worker.terminate)
        queue = rtq.connect(url, prefix)
        deadline = time.monotonic() + 60
        while not queue.live_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        with rtq.Executor(queue, name) as ex:
            result = {
                "actor": actor_round_trip(ex, queue, name, args.calls),
                "cells": session_cells(url, prefix, name, args.cells),
            }
    print(json.dumps(result, indent=2) if args.json else "\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
