"""What a worker's heartbeat record says about its machine: host load, its own memory, its GPUs.

Sampled by the watchdog's beat (:mod:`rtq.worker.watchdog`) and written into the worker's
record, where ``rtq status``, ``%rtq status`` and ``rtq dashboard`` read it. Each sample is
cheap: ``os.getloadavg()``, one read of ``/proc/self/statm`` and, for GPUs, a few NVML calls
per device (``nvidia-ml-py``, the ``rtq[gpu]`` extra: calls into the driver, no ``nvidia-smi``
subprocess). A sample is reused for :data:`REFRESH_S` seconds, however often the worker beats.

Fields added to the record (each only where it can be had):

=============  ==============================================================================
field          value
=============  ==============================================================================
load           the host's 1-minute load average (``os.getloadavg``; not on Windows)
cpus           the host's CPU count
rss            this worker process's resident memory in bytes (Linux: ``/proc/self/statm``)
gpu_metrics    one dict per GPU this worker may use: ``index``, ``name``, ``memory_used``,
               ``memory_total`` (bytes), ``utilization`` (percent), ``temperature`` (°C)
=============  ==============================================================================

Without NVML (not installed, no driver, no GPU) ``gpu_metrics`` is absent, and every view says
"no GPU". What this is NOT: a profiler or a history; it is the latest value, a beat old.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["REFRESH_S", "GpuSampler", "Metrics", "host_sample"]

logger = logging.getLogger("rtq.worker")

REFRESH_S = 1.0
"""Shortest time between two samples: a worker beating every 50 ms still reads NVML once a second."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_sample() -> dict[str, Any]:
    """``load``, ``cpus`` and ``rss`` of this host and process, each where the platform tells it."""
    out: dict[str, Any] = {"cpus": os.cpu_count() or 1}
    try:
        out["load"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows; a host that cannot tell
        pass
    try:
        with open("/proc/self/statm", "rb") as fh:
            out["rss"] = int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):  # no /proc: not Linux
        pass
    return out


def _nvml() -> Any:
    """The ``pynvml`` module of nvidia-ml-py, or None when it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pynvml


class GpuSampler:
    """Reads the GPUs a worker may use through NVML: their memory, load and temperature.

    NVML is initialised once, on the first sample, and the devices' handles are kept; a failure
    there (no library, no driver) turns the sampler off for good, logged once at debug level,
    since a machine without GPUs is normal. A field a device does not support (temperature on
    some boards, utilisation of a MIG slice) is left out of that device's dict.

    Args:
        nvml: The NVML module (default: ``pynvml`` from nvidia-ml-py, when installed).
        visible: The devices this worker may use, as ``CUDA_VISIBLE_DEVICES`` lists them
            (indices or ``GPU-``/``MIG-`` UUIDs); None: that variable's value, else every GPU.
    """

    def __init__(self, nvml: Any = None, visible: str | None = None) -> None:
        self.nvml = nvml if nvml is not None else _nvml()
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        self.handles: list[Any] | None = None  # None: not initialised yet
        self.off = self.nvml is None

    def _open(self) -> list[Any]:
        nvml = self.nvml
        nvml.nvmlInit()
        if self.visible is None:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for entry in (e.strip() for e in self.visible.split(",")):
            if not entry:
                continue
            if entry.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            elif entry.startswith(("GPU-", "MIG-")):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
            else:  # CUDA stops at the first entry it cannot read ("-1" hides every GPU)
                break
        return handles

    def sample(self) -> list[dict[str, Any]] | None:
        """One dict per visible GPU, or None when NVML cannot be used here."""
        if self.off:
            return None
        if self.handles is None:
            try:
                self.handles = self._open()
            except Exception as exc:  # pynvml.NVMLError*, a broken driver: no GPU metrics here
                logger.debug("no GPU metrics: NVML is not usable (%s)", exc)
                self.off = True
                return None
        if not self.handles:  # NVML works, but this worker may use no GPU
            return None
        return [self._device(h) for h in self.handles]

    def _device(self, handle: Any) -> dict[str, Any]:
        nvml = self.nvml
        out: dict[str, Any] = {}
        reads: list[tuple[str, Callable[[], Any]]] = [
            ("index", lambda: int(nvml.nvmlDeviceGetIndex(handle))),
            ("name", lambda: _str(nvml.nvmlDeviceGetName(handle))),
            ("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle)),
            ("utilization", lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            ("temperature", lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
        ]
        for name, read in reads:
            try:
                value = read()
            except Exception:  # NVMLError_NotSupported and friends: that field is left out
                continue
            if name == "memory":
                out["memory_used"], out["memory_total"] = int(value.used), int(value.total)
            else:
                out[name] = value
        return out

    def close(self) -> None:
        """Shut NVML down (when it was started)."""
        if self.handles is not None and not self.off:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
        self.handles, self.off = None, True


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Metrics:
    """The machine fields of a worker's record, sampled at most every ``refresh`` seconds.

    Args:
        gpus: Reads the GPUs (None: a :class:`GpuSampler` of this process's visible GPUs).
        refresh: Seconds a sample is reused.
    """

    def __init__(self, gpus: GpuSampler | None = None, refresh: float = REFRESH_S) -> None:
        self.gpus = gpus if gpus is not None else GpuSampler()
        self.refresh = refresh
        self._last: dict[str, Any] = {}
        self._at = -float("inf")

    def sample(self) -> dict[str, Any]:
        """The fields to merge into the record now."""
        now = time.monotonic()
        if now - self._at >= self.refresh:
            fields = host_sample()
            gpus = self.gpus.sample()
            if gpus is not None:
                fields["gpu_metrics"] = gpus
            self._last, self._at = fields, now
        return self._last

    def close(self) -> None:
        self.gpus.close()
