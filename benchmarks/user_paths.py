"""The paths users write most, measured next to the ones rtq is best at (``benchmarks/run.py``).

* a submit loop, ``futs = [ex.submit(f, i) for i in range(n)]`` then every result, next to
  ``Executor.map`` on the same workers;
* a ``bytes`` echo and a DataFrame echo (numeric columns; and one ``object`` column of strings,
  as it pickles item by item), each alternating with raw SET+GET of as many bytes, next to
  the numpy echo of the same size (the ``bytes`` samples alternate with numpy echoes too, so
  that their ratio compares like with like). The DataFrame rows need pandas (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import bench_tasks

MB = 1_000_000


def submit_loop(ex: Any, n: int) -> dict[str, Any]:
    """``n`` no-op calls submitted one by one in a loop, then every result."""
    [f.result(120) for f in [ex.submit(bench_tasks.noop, i) for i in range(200)]]  # warm up
    start = time.perf_counter()
    futures = [ex.submit(bench_tasks.noop, i) for i in range(n)]
    for fut in futures:
        fut.result(300)
    elapsed = time.perf_counter() - start
    return {"tasks": n, "seconds": elapsed, "tasks_s": n / elapsed}


def _rate(size: int, samples: list[float]) -> dict[str, float]:
    median = statistics.median(samples)
    return {"bytes": size, "n": len(samples), "median_s": median, "mb_s": size / median / MB}


def _echo(
    ex: Any,
    make: Callable[[int], Any],
    same: Callable[[Any, Any], bool],
    raw: Callable[[], None],
    size: int,
    reps: int,
    numpy: Callable[[int], Any] | None = None,
) -> Any:
    """Echo a fresh value each sample (``make(i)``): digests (#19) would make a repeat a second send.

    With ``numpy`` (a maker of arrays of as many bytes), each sample also echoes a fresh array,
    so that the two rates come from the same minutes of the machine.
    """
    first = make(0)
    back = ex.submit(bench_tasks.echo, first).result(300)
    assert same(first, back), "the echoed value differs"
    del back, first
    samples: dict[str, list[float]] = {"rtq": [], "raw": [], "numpy": []}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        fn()
        samples[name].append(time.perf_counter() - start)

    for i in range(1, reps + 1):  # alternating with the floor, as benchmarks/run.py does
        value = make(i)
        timed("raw", raw)
        timed("rtq", lambda value=value: ex.submit(bench_tasks.echo, value).result(300))
        del value
        if numpy is not None:
            array = numpy(i)
            timed("numpy", lambda array=array: ex.submit(bench_tasks.echo, array).result(300))
            del array
    return {name: _rate(size, taken) for name, taken in samples.items() if taken}


def echoes(ex: Any, floor: Any, size: int, reps: int) -> dict[str, Any]:
    """Echo ``size`` bytes as ``bytes``, and as DataFrames when pandas is there (new contents every sample)."""
    import numpy as np

    data = np.random.default_rng(size).bytes(size)

    def fresh_bytes(i: int) -> bytes:
        return np.random.default_rng(i).bytes(size)

    def same_bytes(sent: Any, back: Any) -> bool:
        return type(back) is bytes and back == sent

    def fresh_array(i: int) -> Any:
        # Not the same bytes as fresh_bytes(i) (a seed of its own): Redis would hold them already.
        return np.random.default_rng([i, 1]).integers(0, 256, size, dtype=np.uint8)

    raw = lambda: floor.set_get(data, size)  # noqa: E731
    out: dict[str, Any] = {"bytes": _echo(ex, fresh_bytes, same_bytes, raw, size, reps, numpy=fresh_array)}
    if importlib.util.find_spec("pandas") is None:
        out["dataframe"] = {"skipped": 'pandas is not installed (pip install -e ".[bench]")'}
        return out
    import pandas as pd

    rows = size // 16

    def numeric(i: int) -> Any:
        return pd.DataFrame({"x": np.arange(rows, dtype="f8") + i, "n": np.arange(rows, dtype="i8") - i})

    nbytes = int(numeric(0).memory_usage(index=False).sum())
    view = memoryview(bytearray(nbytes))
    equal = lambda sent, back: sent.equals(back)  # noqa: E731
    out["dataframe"] = _echo(ex, numeric, equal, lambda: floor.set_get(view, nbytes), nbytes, reps)

    def words(i: int) -> Any:
        return pd.DataFrame({"s": pd.Series([f"item-{i}-{j:08d}" for j in range(size // 64)], dtype=object)})

    text_bytes = int(words(0)["s"].str.len().sum())
    strings = memoryview(bytearray(text_bytes))
    out["strings"] = _echo(ex, words, equal, lambda: floor.set_get(strings, text_bytes), text_bytes, reps)
    return out


def render(rtq: dict[str, Any]) -> list[str]:
    """Markdown lines: the submit loop next to ``map``, and the bytes and DataFrame echoes next to numpy."""
    lines: list[str] = []
    if "submit_loop" in rtq and "throughput" in rtq:
        loop, tput = rtq["submit_loop"]["tasks_s"], rtq["throughput"]["tasks_s"]
        lines += [
            "",
            f"Submit loop: `[ex.submit(f, i) for i in range(n)]`, then every result: {loop:.0f} tasks/s against "
            f"{tput:.0f} for `Executor.map` on the same workers ({loop / tput:.0%}).",
        ]
    paths = rtq.get("user_echo") or {}
    if paths:
        numpy_rate = numpy_echo_rate(rtq)
        lines += ["", "| payload | raw SET+GET | rtq echo (`Executor.submit`) | rtq / raw | rtq / numpy echo |"]
        lines.append("|---|---|---|---|---|")
        names = {
            "bytes": "`bytes`",
            "dataframe": "DataFrame, 2 numeric columns",
            "strings": "DataFrame, 1 `object` column of short strings",
        }
        for key, label in names.items():
            row = paths.get(key)
            if not row or "rtq" not in row:
                if row:
                    lines.append(f"| {label} | {row.get('skipped', '')} | | | |")
                continue
            a, b = row["raw"]["mb_s"], row["rtq"]["mb_s"]
            vs = f"{b / numpy_rate:.0%}" if numpy_rate else "—"
            size = row["rtq"]["bytes"] / (1 << 20)
            lines.append(f"| {label} ({size:.0f} MiB) | {a:.0f} MB/s | {b:.0f} MB/s | {b / a:.0%} | {vs} |")
        if numpy_rate:
            lines += ["", f"The numpy echo they are compared with: {numpy_rate:.0f} MB/s (beside the `bytes` ones)."]
    return lines


def numpy_echo_rate(rtq: dict[str, Any]) -> float | None:
    """The numpy echo the user paths compare with: the one measured alongside the ``bytes`` echo, else the echo row."""
    paths = rtq.get("user_echo") or {}
    paired = paths.get("bytes", {}).get("numpy", {}).get("mb_s")
    return paired or rtq.get("echo", {}).get(str(paths.get("size")), {}).get("mb_s")


def targets(rtq: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Issue #17's targets, measured in this run."""
    out: dict[str, Any] = {}
    bare = raw.get("queue", {}).get("median_ms")
    if bare and "query" in rtq:
        q, s = rtq["query"]["median_ms"] / bare, rtq["submit"]["median_ms"] / bare
        out["query_floor"] = {"value": q, "limit": 3.0, "ok": q <= 3.0}
        out["submit_floor"] = {"value": s, "limit": 3.5, "ok": s <= 3.5}
    if "submit_loop" in rtq and "throughput" in rtq:
        r = rtq["submit_loop"]["tasks_s"] / rtq["throughput"]["tasks_s"]
        out["loop_map"] = {"value": r, "limit": 0.8, "ok": r >= 0.8}
    paths = rtq.get("user_echo") or {}
    numpy_rate = numpy_echo_rate(rtq)
    if numpy_rate and "rtq" in paths.get("bytes", {}):
        r = paths["bytes"]["rtq"]["mb_s"] / numpy_rate
        out["bytes_numpy"] = {"value": r, "limit": 0.8, "ok": r >= 0.8}
    return out


TARGET_ROWS = [
    ("`query()` ≤ 3x the bare queue", "query_floor", "{:.2f}x"),
    ("`submit().result()` ≤ 3.5x the bare queue", "submit_floor", "{:.2f}x"),
    ("submit loop ≥ 80 % of `Executor.map`", "loop_map", "{:.0%}"),
    ("32 MiB `bytes` echo ≥ 80 % of the numpy echo", "bytes_numpy", "{:.0%}"),
]
