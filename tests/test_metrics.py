"""Machine metrics in worker heartbeats: host load, the worker's memory, its GPUs through NVML.

The no-NVML path runs for real (a real worker on this machine, which has no NVIDIA driver).
The NVML path is driven through nvidia-ml-py's API boundary (the ``pynvml`` functions rtq
calls) by a stand-in module handed to :class:`GpuSampler`: there is no GPU here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Workers, child_env, wait_for
from rtq.status import format_status
from rtq.worker.metrics import GpuSampler, Metrics, host_sample

pytestmark = pytest.mark.timeout(60)


class NVMLError(Exception):
    """pynvml's error root."""


def stand_in_nvml(*, fail_init: bool = False, no_temperature: bool = False) -> types.SimpleNamespace:
    """A module with the pynvml functions rtq calls, for two GPUs; it counts the calls."""
    gpus = [
        {"uuid": "GPU-aaaa", "name": b"NVIDIA H200", "used": 12 * 2**30, "total": 141 * 2**30, "util": 87, "temp": 64},
        {"uuid": "GPU-bbbb", "name": "NVIDIA H200", "used": 1 * 2**30, "total": 141 * 2**30, "util": 0, "temp": 31},
    ]
    calls: list[str] = []

    def call(name: str, fn: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            calls.append(name)
            return fn(*args)

        return wrapped

    def init() -> None:
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def temperature(handle: int, sensor: int) -> int:
        assert sensor == 0
        if no_temperature:
            raise NVMLError("Not Supported")
        return int(gpus[handle]["temp"])  # type: ignore[call-overload]

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=call("init", init),
        nvmlShutdown=call("shutdown", lambda: None),
        nvmlDeviceGetCount=call("count", lambda: len(gpus)),
        nvmlDeviceGetHandleByIndex=call("by_index", lambda i: range(len(gpus))[i]),
        nvmlDeviceGetHandleByUUID=call("by_uuid", lambda u: [g["uuid"] for g in gpus].index(u)),
        nvmlDeviceGetIndex=call("index", lambda h: h),
        nvmlDeviceGetName=call("name", lambda h: gpus[h]["name"]),
        nvmlDeviceGetMemoryInfo=call(
            "memory", lambda h: types.SimpleNamespace(used=gpus[h]["used"], total=gpus[h]["total"], free=0)
        ),
        nvmlDeviceGetUtilizationRates=call("util", lambda h: types.SimpleNamespace(gpu=gpus[h]["util"], memory=5)),
        nvmlDeviceGetTemperature=call("temperature", temperature),
    )


def test_every_visible_gpu_is_reported_with_memory_load_and_temperature() -> None:
    nvml = stand_in_nvml()
    sampled = GpuSampler(nvml, visible=None).sample()
    assert sampled == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "memory_used": 12 * 2**30,
            "memory_total": 141 * 2**30,
            "utilization": 87,
            "temperature": 64,
        },
        {
            "index": 1,
            "name": "NVIDIA H200",
            "memory_used": 2**30,
            "memory_total": 141 * 2**30,
            "utilization": 0,
            "temperature": 31,
        },
    ]


@pytest.mark.parametrize(
    ("visible", "indices"), [("1", [1]), ("GPU-bbbb,0", [1, 0]), ("", None), ("-1", None), ("0,-1,1", [0])]
)
def test_a_pinned_worker_reports_only_its_own_gpus(visible: str, indices: list[int] | None) -> None:
    sampled = GpuSampler(stand_in_nvml(), visible=visible).sample()
    assert (None if sampled is None else [g["index"] for g in sampled]) == indices


def test_a_field_the_device_does_not_support_is_left_out() -> None:
    sampled = GpuSampler(stand_in_nvml(no_temperature=True), visible="0").sample()
    assert sampled is not None and "temperature" not in sampled[0] and sampled[0]["utilization"] == 87


def test_nvml_that_cannot_start_means_no_gpu_fields_and_it_is_not_retried_each_beat() -> None:
    nvml = stand_in_nvml(fail_init=True)
    metrics = Metrics(GpuSampler(nvml, visible=None), refresh=0)
    for _ in range(3):
        assert "gpu_metrics" not in metrics.sample()
    assert nvml.calls == ["init"]


def test_samples_are_reused_within_the_refresh_time() -> None:
    nvml = stand_in_nvml()
    metrics = Metrics(GpuSampler(nvml, visible="0"), refresh=3600)
    first = metrics.sample()
    assert first["gpu_metrics"][0]["memory_used"] == 12 * 2**30
    reads = len(nvml.calls)
    assert metrics.sample() is first and len(nvml.calls) == reads
    metrics.close()
    assert nvml.calls[-1] == "shutdown"


def test_host_sample_is_this_process_and_host() -> None:
    sample = host_sample()
    assert sample["cpus"] == os.cpu_count()
    assert sample["load"] == pytest.approx(os.getloadavg()[0], abs=1.0)
    status = Path("/proc/self/status").read_text()
    vm_rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    assert sample["rss"] == pytest.approx(vm_rss_kib * 1024, rel=0.2)


def test_status_shows_each_gpu_and_no_gpu_otherwise() -> None:
    gpu = {"index": 0, "name": "NVIDIA H200", "memory_used": 12 * 2**30, "memory_total": 141 * 2**30}
    workers = [
        {"id": "with-gpu", "queues": ["gpu"], "gpu_metrics": [{**gpu, "utilization": 87, "temperature": 64}]},
        {"id": "without", "queues": ["cpu"], "load": 0.5, "cpus": 8, "rss": 3 * 2**20},
        {"id": "no-nvml", "queues": ["gpu"], "gpus": ["0", "1"]},
    ]
    text = format_status({"workers": workers, "queues": {}, "running": [], "dead": 0})
    assert "    GPU 0 NVIDIA H200  12.0 GiB of 141.0 GiB memory  87% busy  64°C" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line[2] != " "}
    assert "no GPU" not in lines["with-gpu"]
    assert "load 0.50 (8 cpus)  rss 3.0 MiB  no GPU" in lines["without"]
    assert "gpus=0,1 (no metrics without NVML" in lines["no-nvml"]


def test_a_real_worker_without_nvml_beats_its_load_and_memory_and_says_no_gpu(
    workers: Workers, r: Any, redis_url: str
) -> None:
    proc = workers.start("metrics", task_fn=None)
    key = wait_for(lambda: next(iter(r.keys("test|task-queue|worker:*")), None), 15, "the worker's record")

    def record() -> dict[str, Any]:
        return json.loads(r.get(key) or "{}")  # type: ignore[no-any-return]

    wait_for(lambda: "rss" in record(), 15, "a beat with the machine's fields")
    beat = record()
    assert beat["cpus"] == os.cpu_count() and isinstance(beat["load"], float)
    assert "gpu_metrics" not in beat
    status = Path(f"/proc/{proc.pid}/status").read_text()
    vm_rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    assert beat["rss"] == pytest.approx(vm_rss_kib * 1024, rel=0.5)
    done = subprocess.run(
        [sys.executable, "-m", "rtq", "status", "--url", redis_url, "--prefix", "test"],
        env={**child_env(), "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    worker_line = next(line for line in done.stdout.splitlines() if "queues=metrics" in line)
    assert "no GPU" in worker_line and "rss " in worker_line and "load " in worker_line, done.stdout
