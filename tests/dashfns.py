"""Task functions the dashboard tests ship to workers (importable by them from tests/)."""

from __future__ import annotations

import os
import time
from typing import Any

import rtq


def steps(stop_file: str, options: dict[str, Any]) -> int:
    """Print a line and report progress every 0.2 s until ``stop_file`` exists (at most 600 steps)."""
    total = 600
    for i in range(total):
        if os.path.exists(stop_file):
            return i
        print(f"step {i} of {options['name']}", flush=True)
        rtq.current_task().update(i + 1, total)
        time.sleep(0.2)  # the task's own pace: the test waits for the page, not for this
    return total


def fail_loudly(reason: str) -> None:
    """Fail with ``reason``, two frames deep (the traceback names both)."""

    def inner() -> None:
        raise ValueError(f"dashboard check: {reason}")

    inner()
