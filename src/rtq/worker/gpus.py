"""GPU pinning for ``rtq worker --gpus``: one worker process per GPU.

Each child runs the same ``rtq worker`` command with ``CUDA_VISIBLE_DEVICES`` set to one GPU, so
a task lands on exactly one GPU and frameworks see it as ``cuda:0``. The parent only supervises:
it forwards SIGTERM/SIGINT so every child finishes its running tasks, and exits 0 when they did.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..server import die_with_parent

__all__ = ["GpusUnknown", "detect_gpus", "list_gpus", "parse_gpus", "supervise", "visible_gpus"]


class GpusUnknown(LookupError):
    """Raised when this machine's GPUs cannot be listed (no ``nvidia-smi``, no NVML, or they fail)."""


_GPU_LINE = re.compile(r"^GPU (\d+):.*\(UUID: (GPU-[^)\s]+)\)")
_MIG_UUID = re.compile(r"\(UUID: (MIG-[^)\s]+)\)")


def list_gpus() -> tuple[list[str], set[str]]:
    """This machine's NVIDIA GPUs: their indices, and the UUIDs of them and their MIG devices.

    From ``nvidia-smi -L``, else from NVML (``pip install nvidia-ml-py``).

    Raises:
        GpusUnknown: neither is there, or both failed (the reason says how).
    """
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as exc:
            problem = f"nvidia-smi -L failed: {exc}"
        else:
            lines = done.stdout.splitlines()
            gpus = [m.groups() for m in map(_GPU_LINE.match, lines) if m]
            if gpus or done.returncode == 0 or "no devices were found" in done.stdout.lower():
                uuids = {u for _, u in gpus} | {m.group(1) for m in map(_MIG_UUID.search, lines) if m}
                return [i for i, _ in gpus], uuids
            said = (done.stderr or done.stdout).strip().splitlines()
            problem = f"nvidia-smi -L failed: {said[0] if said else f'exit status {done.returncode}'}"
    else:
        problem = "nvidia-smi is not on PATH"
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        raise GpusUnknown(f"{problem}, and NVML is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            uuids = {_str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)}
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # pynvml.NVMLError and whatever a broken driver raises
        raise GpusUnknown(f"{problem}, and NVML failed: {exc}") from exc
    return [str(i) for i in range(count)], uuids


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def detect_gpus() -> list[str]:
    """Indices of the NVIDIA GPUs on this machine (empty when there are none, or they cannot be listed)."""
    try:
        return list_gpus()[0]
    except GpusUnknown:
        return []


def parse_gpus(spec: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; ``"all"`` → every GPU of this machine.

    Each GPU named must exist here: it is checked against what :func:`list_gpus` finds.

    Raises:
        ValueError: the spec is malformed, names a GPU this machine does not have, or the
            machine's GPUs cannot be listed (so neither ``all`` nor a GPU can be checked).
    """
    wanted = [g.strip() for g in spec.split(",") if g.strip()]
    if spec.strip().lower() != "all":
        if not wanted or any(not (g.isdigit() or g.startswith(("GPU-", "MIG-"))) for g in wanted):
            raise ValueError(f"--gpus takes 'all' or a comma-separated list of GPU indices or UUIDs, not {spec!r}")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"--gpus lists a GPU twice: {spec!r}")
    try:
        indices, uuids = list_gpus()
    except GpusUnknown as exc:
        raise ValueError(f"--gpus {spec}: cannot list this machine's GPUs to check it ({exc})") from None
    if spec.strip().lower() == "all":
        if not indices:
            raise ValueError("--gpus all: this machine has no GPU (nvidia-smi lists none)")
        return indices
    missing = [g for g in wanted if g not in (uuids if g.startswith(("GPU-", "MIG-")) else indices)]
    if missing:
        has = f"{len(indices)} GPU(s): {', '.join(indices)}" if indices else "no GPU"
        raise ValueError(f"--gpus {spec}: this machine has no GPU {', '.join(missing)} (it has {has})")
    return wanted


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
