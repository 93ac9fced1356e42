"""GPU pinning for ``rtq worker --gpus``: one worker process per GPU.

Each child runs the same ``rtq worker`` command with ``CUDA_VISIBLE_DEVICES`` set to one GPU, so
a task lands on exactly one GPU and frameworks see it as ``cuda:0``. The parent only supervises:
it forwards SIGTERM/SIGINT so every child finishes its running tasks, and exits 0 when they did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..server import die_with_parent

__all__ = ["detect_gpus", "parse_gpus", "supervise", "visible_gpus"]


def detect_gpus() -> list[str]:
    """Indices of the NVIDIA GPUs on this machine (empty without ``nvidia-smi`` or GPUs)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def parse_gpus(spec: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; ``"all"`` → every detected GPU.

    Raises:
        ValueError: the spec is malformed, or ``all`` found no GPU.
    """
    if spec.strip().lower() == "all":
        found = detect_gpus()
        if not found:
            raise ValueError("--gpus all: no GPU found (nvidia-smi is missing or lists none)")
        return found
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or any(not (g.isdigit() or g.startswith(("GPU-", "MIG-"))) for g in gpus):
        raise ValueError(f"--gpus takes 'all' or a comma-separated list of GPU indices or UUIDs, not {spec!r}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {spec!r}")
    return gpus


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as announced in its worker record."""
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [g for g in pinned.split(",") if g.strip()]
    return detect_gpus()


def supervise(child_argv: Sequence[str], gpus: Sequence[str]) -> int:
    """Run ``rtq worker`` ``child_argv`` once per GPU, each pinned to it; returns the exit code."""
    children: list[subprocess.Popen[bytes]] = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "rtq", "worker", *child_argv],
                env=env,
                # a SIGKILLed supervisor must not leave its GPU workers behind
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        )
    print(f"rtq worker: started {len(children)} worker process(es), one per GPU: {', '.join(gpus)}", flush=True)

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
