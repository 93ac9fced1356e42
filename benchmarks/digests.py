#!/usr/bin/env python
"""Data travels once: the first and the second send of a big array, and the send as it was before.

For a 256 MiB and a 1 GiB numpy array (uint8) it times ``Executor.submit(len, arr).result()``:

* **before**: buffers travel as frames, as before digests (the client's ``DIGEST_MIN`` raised
  past the array's size), fresh bytes each sample;
* **first**: by digest, bytes Redis does not hold yet (fresh bytes each sample: the hashing, the
  question and the transfer);
* **second**: the same array again (only its digest is sent, and the worker's cache serves it);

and the same for a ``%%rtq`` cell reading a 256 MiB array (``n = len(x)``), run in an IPython
shell in this process. Samples alternate (before, first, second), and the digest keys are
deleted after each, so every "first" is really first. Medians; the 1 GiB rows take fewer samples
(they move 2 GiB through Redis each).

    python benchmarks/digests.py                 # its own embedded server and worker
    python benchmarks/digests.py --quick         # 256 MiB only, 3 samples

``benchmarks/run.py`` runs it after rtq's measures (``measure``) and adds its rows (``render``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
QUEUE = "bench-digests"
PREFIX = "bench-digests"


def measure(url: str, *, sizes: tuple[int, ...], samples: dict[int, int], cell: bool = True) -> dict[str, Any]:
    """Start a worker on ``url``, time the three sends of each size (and the cell), stop the worker."""
    import numpy as np
    import redis

    import rtq

    client = redis.Redis.from_url(url)
    queue = rtq.connect(url, PREFIX, max_payload=2 << 30, timeout=600)
    out: dict[str, Any] = {"submit": {}}
    with worker(url) as proc:
        wait_until(lambda: client.exists(queue.keys.listen(QUEUE)), 60, "the worker", proc)
        with rtq.Executor(queue, QUEUE) as ex:
            ex.submit(len, b"warm up").result(60)
            for size in sizes:
                data = np.random.default_rng(size).integers(0, 255, size=size, dtype=np.uint8)
                out["submit"][str(size)] = submit_times(ex, data, samples[size], client)
                del data
        if cell:
            out["cell"] = {str(sizes[0]): cell_times(url, sizes[0], samples[sizes[0]], client)}
    client.close()
    return out


def submit_times(ex: Any, data: Any, n: int, client: Any) -> dict[str, Any]:
    """``ex.submit(len, data)``: as before digests, the first time, and again."""
    times: dict[str, list[float]] = {"before": [], "first": [], "second": []}
    failed = ""

    def send() -> None:
        assert ex.submit(len, data).result(600) == len(data)

    for i in range(n):
        data[:8] = 2 * i  # new bytes: a new digest
        if i == 0 or times["before"]:
            try:
                with digests_off():
                    times["before"].append(timed(send))
            except Exception as exc:  # before digests a transaction carried it all: a server may refuse
                times["before"].clear()
                failed = f"{type(exc).__name__}: {exc}"
        forget(client)
        data[:8] = 2 * i + 1
        times["first"].append(timed(send))
        times["second"].append(timed(send))
        forget(client)
    return summary(times) if times["before"] else {**summary(times), "before_failed": failed}


def cell_times(url: str, size: int, n: int, client: Any) -> dict[str, Any]:
    """The ``%%rtq`` run path: a cell reading a ``size`` array, the first time and again."""
    import numpy as np
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rtq")
    shell.run_line_magic("rtq", f"connect {url} --prefix {PREFIX} --queue {QUEUE}")
    # Not the bytes the submit rows sent: the worker's cache may still hold those.
    data = np.random.default_rng(size + 1).integers(0, 255, size=size, dtype=np.uint8)
    shell.user_ns["x"] = data
    times: dict[str, list[float]] = {"before": [], "first": [], "second": []}

    def run() -> None:
        shell.run_cell_magic("rtq", f"--size-warn {4 * size}", "n = len(x)")
        assert shell.user_ns["n"] == size

    run()  # warm up: the connection, the cell's analysis
    forget(client)
    for i in range(n):
        data[:8] = 2 * i
        with digests_off():
            times["before"].append(timed(run))
        forget(client)
        data[:8] = 2 * i + 1
        times["first"].append(timed(run))
        times["second"].append(timed(run))
        forget(client)
    return summary(times)


@contextlib.contextmanager
def digests_off() -> Iterator[None]:
    """Buffers travel as frames, as they did before digests (the client side decides)."""
    import rtq.serialization

    saved = rtq.serialization.DIGEST_MIN
    rtq.serialization.DIGEST_MIN = 1 << 62
    try:
        yield
    finally:
        rtq.serialization.DIGEST_MIN = saved


def forget(client: Any) -> None:
    """Delete the namespace's digest keys (the next send of anything is a first one)."""
    keys = list(client.scan_iter(match=f"{PREFIX}|task-queue|blob:*", count=1000))
    if keys:
        client.delete(*keys)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out = {"n": len(times["first"]), **{f"{k}_s": v for k, v in med.items()}, "speedup": med["first"] / med["second"]}
    if "before" in med:
        out["first_vs_before"] = med["first"] / med["before"]
    return out


@contextlib.contextmanager
def worker(url: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    cmd = [sys.executable, "-m", "rtq", "worker", QUEUE, "--url", url, "--prefix", PREFIX, "--workers", "1"]
    cmd += ["--timeout", "600", "--max-payload", str(2 << 30), "--cache-bytes", "2G"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)  # another process starting: nothing to block on


def render(result: dict[str, Any]) -> list[str]:
    """The Markdown rows of ``result`` (from :func:`measure`)."""
    lines = [
        "",
        "| data travels once (numpy uint8) | before digests | first send | second send | second vs first | "
        "first vs before |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(f"`Executor.submit(len, arr)`, {int(k) // MiB} MiB", v) for k, v in result["submit"].items()]
    rows += [(f"`%%rtq` cell reading {int(k) // MiB} MiB", v) for k, v in result.get("cell", {}).items()]
    for label, v in rows:
        before = f"{v['before_s'] * 1e3:.0f} ms" if "before_s" in v else "refused by the server"
        versus = f"{v['first_vs_before'] - 1:+.0%}" if "first_vs_before" in v else "—"
        lines.append(
            f"| {label} (median of {v['n']}) | {before} | {v['first_s'] * 1e3:.0f} ms "
            f"| {v['second_s'] * 1e3:.1f} ms | {v['speedup']:.0f}x faster | {versus} |"
        )
    failed = [v["before_failed"] for v in result["submit"].values() if "before_failed" in v]
    if failed:
        lines += ["", f"Before digests, the server refused the 1 GiB transaction: {failed[0]}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a Redis to use (default: an embedded server of its own)")
    parser.add_argument("--quick", action="store_true", help="256 MiB only, 3 samples")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from rtq.server import EmbeddedServer

    sizes = (256 * MiB,) if args.quick else (256 * MiB, 1024 * MiB)
    samples = {256 * MiB: 3 if args.quick else 5, 1024 * MiB: 3}
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(EmbeddedServer()).url
        result = measure(url, sizes=sizes, samples=samples)
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
