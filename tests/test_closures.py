"""Closures shipped to real worker processes through rtq.Executor (issue: Closures)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import rtq
from conftest import ROOT, fake_nvidia_smi, wait_for
from rtq.errors import SerializationError, TaskCancelled, VersionMismatch

# Workers get only src/ on their path: nothing defined in this test module (or next to it) can be
# imported there, so everything below must travel by value.
ISOLATED = {"PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def ex(queue, workers):
    workers.start("cl", task_fn=None, env=ISOLATED, args=("--workers", "2"))
    executor = rtq.Executor(queue, "cl", timeout=30)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def norm2(self) -> int:
        return self.x * self.x + self.y * self.y


def test_closure_lambda_and_captured_variables(ex):
    offset = 10
    scale = {"factor": 3}

    def add(x):
        return (x + offset) * scale["factor"]

    assert ex.submit(add, 1).result(10) == 33
    assert ex.submit(lambda a, b=2: a**b, 5, b=3).result(10) == 125


def test_local_class_and_instance_round_trip(ex):
    class Local:
        def __init__(self, v):
            self.v = v

        def double(self):
            return Local(self.v * 2)

    out = ex.submit(lambda obj: obj.double(), Local(21)).result(10)
    assert type(out).__name__ == "Local" and out.v == 42
    assert ex.submit(Point.norm2, Point(3, 4)).result(10) == 25


def test_local_module_is_shipped_by_value(ex, tmp_path, monkeypatch):
    (tmp_path / "nb_helpers_xq.py").write_text(
        textwrap.dedent(
            """
            SECRET_SAUCE = 7

            def helper(x):
                return x * SECRET_SAUCE
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import nb_helpers_xq

    try:
        assert ex.submit(nb_helpers_xq.helper, 6).result(10) == 42
    finally:
        sys.modules.pop("nb_helpers_xq", None)


def test_numpy_array_64mib_round_trip(ex):
    np = pytest.importorskip("numpy")
    data = np.arange(8 * 2**20, dtype=np.float64)  # 64 MiB
    out = ex.submit(lambda a: a * 2, data).result(60)
    assert out.shape == data.shape and out.dtype == data.dtype
    assert float(out[-1]) == float(data[-1]) * 2 and bool((out[:1000] == data[:1000] * 2).all())


def test_big_frames_are_gone_once_the_result_arrived(ex, r):
    np = pytest.importorskip("numpy")
    data = np.arange(2**18, dtype=np.float64)  # 2 MiB: stored by digest, under keys of its own
    fut = ex.submit(lambda a: a + 1, data)
    assert float(fut.result(30)[-1]) == float(data[-1]) + 1
    record = f"test|task-queue|task-result:{fut.task_id}"
    # The record is consumed right after the result is handed over (not before result() returns).
    wait_for(
        lambda: not r.exists(record) and not list(r.scan_iter(match=f"{record}|*")),
        10,
        "the call's record and frames to be deleted",
    )
    blobs = list(r.scan_iter(match="test|task-queue|blob:*"))
    assert blobs and all(r.pttl(key) > 0 for key in blobs)  # what is kept by digest expires


def test_remote_exception_keeps_type(ex):
    with pytest.raises(ZeroDivisionError):
        ex.submit(lambda: 1 / 0).result(10)


def test_futures_conformance_wait_as_completed_and_asyncio(ex):
    futures = [ex.submit(lambda i=i: i * i) for i in range(6)]
    done, not_done = cf.wait(futures, timeout=15)
    assert not not_done and {f.result() for f in done} == {i * i for i in range(6)}
    futures = [ex.submit(pow, 2, i) for i in range(4)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=15)) == [1, 2, 4, 8]
    assert all(isinstance(f, cf.Future) and isinstance(f, rtq.TaskFuture) for f in futures)

    async def main():
        direct = await ex.submit(abs, -5)
        wrapped = await asyncio.wrap_future(ex.submit(abs, -6))
        return direct, wrapped

    assert asyncio.run(main()) == (5, 6)


def test_result_timeout_does_not_cancel(ex, tmp_path):
    gate = tmp_path / "gate"

    def wait_for_gate():
        while not gate.exists():
            time.sleep(0.01)
        return "through"

    fut = ex.submit(wait_for_gate)
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.2)
    assert not fut.cancelled()
    gate.touch()
    assert fut.result(10) == "through"


def test_cancel_queued_task_never_runs(queue, workers, tmp_path):
    workers.start("one", task_fn=None, env=ISOLATED, args=("--workers", "1"))
    ex = rtq.Executor(queue, "one", timeout=30)
    gate, marker = tmp_path / "gate", tmp_path / "ran"

    def block():
        while not gate.exists():
            time.sleep(0.01)
        return "blocked"

    first = ex.submit(block)
    wait_for(
        lambda: (
            queue.get_task(first.task_id)
            and queue.store.redis.hget(queue.keys.task(first.task_id), "state") == b"running"
        ),
        10,
        "the first task to run",
    )
    second = ex.submit(marker.touch)
    assert second.cancel() is True
    assert second.cancelled()
    with pytest.raises(cf.CancelledError):
        second.result(1)
    assert first.cancel() is False  # running: Future semantics say it cannot be cancelled
    gate.touch()
    assert first.result(10) == "blocked"
    third = ex.submit(lambda: "after")
    assert third.result(10) == "after"  # the worker moved past the cancelled id
    assert not marker.exists()
    ex.shutdown()


def test_stop_running_task_raises_task_cancelled(ex, tmp_path):
    def spin():
        task = rtq.current_task()
        for i in range(10_000):
            task.update(i, 10_000)
            time.sleep(0.01)

    fut = ex.submit(spin)
    wait_for(lambda: fut.progress[0] > 0, 10, "progress from the task")
    assert fut.stop() is True
    with pytest.raises(TaskCancelled):
        fut.result(10)


def test_map_keeps_order_with_chunksize_and_timeout(ex):
    assert list(ex.map(lambda x: x * 3, range(50))) == [x * 3 for x in range(50)]
    assert list(ex.map(lambda a, b: a - b, range(40), range(0, 80, 2), chunksize=7)) == [-x for x in range(40)]
    results = ex.map(time.sleep, [5], timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        next(results)


def test_shutdown_cancel_futures(queue, workers, tmp_path):
    workers.start("sd", task_fn=None, env=ISOLATED, args=("--workers", "1"))
    ex = rtq.Executor(queue, "sd", timeout=30)
    gate = tmp_path / "gate"

    def block():
        while not gate.exists():
            time.sleep(0.01)
        return 1

    first = ex.submit(block)
    wait_for(lambda: queue.store.redis.hget(queue.keys.task(first.task_id), "state") == b"running", 10, "running")
    rest = [ex.submit(lambda: 2) for _ in range(3)]
    threading.Timer(0.3, gate.touch).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result(0) == 1
    assert all(f.cancelled() for f in rest)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(abs, 1)


def test_unpicklable_argument_is_refused_at_submit(ex, queue):
    def task_keys() -> set[bytes]:
        # The worker writes its own record at its first heartbeat, and the set of its claim
        # threads' landing lists at their first wake-up, either of which may come after its
        # queue's marker (what the fixture waits for) on a loaded machine: only tasks count here.
        landings = queue.keys.landings("").encode()
        return {k for k in queue.store.redis.keys(f"{queue.keys.head}task-*") if not k.startswith(landings)}

    before = task_keys()
    with pytest.raises(SerializationError, match="lock"):
        ex.submit(lambda lock: None, threading.Lock())
    assert task_keys() == before


def test_version_skew_is_refused_before_shipping(queue, r):
    record = {
        "id": "gpu-box:1:abc",
        "queues": ["skewed"],
        "python": "2.7",
        "cloudpickle": "0.1.0",
        "workers": 1,
        "started": time.time(),
        "host": "gpu-box",
        "pid": 1,
    }
    r.set(queue.keys.worker(record["id"]), json.dumps(record), ex=30)
    r.zadd(queue.keys.workers(), {record["id"]: time.time() + 30})
    ex = rtq.Executor(queue, "skewed")
    with pytest.raises(VersionMismatch, match=r"python 2\.7.*cloudpickle 0\.1\.0|cloudpickle 0\.1\.0") as info:
        ex.submit(abs, 1)
    assert "gpu-box:1:abc" in str(info.value)
    assert not r.llen(queue.keys.queue("skewed"))


def test_current_task_and_tqdm_report_into_the_task(ex):
    def work():
        for _ in rtq.tqdm(range(5), desc="inner"):
            time.sleep(0.01)
        return rtq.current_task().id

    fut = ex.submit(work)
    assert fut.result(10) == fut.task_id
    assert fut.progress == (5.0, 5.0)


def test_gpu_pinning_one_process_per_gpu(queue, workers, r, tmp_path):
    env = {**ISOLATED, **fake_nvidia_smi(tmp_path, 2)}  # --gpus 0,1 is checked against the GPUs listed
    proc = workers.start("pin", task_fn=None, env=env, args=("--gpus", "0,1", "--workers", "1"), wait=False)
    wait_for(
        lambda: len([w for w in r.zrange(queue.keys.workers(), 0, -1)]) >= 2 or proc.poll() is not None,
        20,
        "two pinned workers",
    )
    assert proc.poll() is None
    records = [json.loads(r.get(queue.keys.worker(w.decode()))) for w in r.zrange(queue.keys.workers(), 0, -1)]
    assert sorted(g for rec in records for g in rec["gpus"]) == ["0", "1"]
    ex = rtq.Executor(queue, "pin", timeout=30)
    seen = set()
    deadline = time.monotonic() + 20
    while seen != {"0", "1"} and time.monotonic() < deadline:
        futs = [ex.submit(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), time.sleep(0.05))[0]) for _ in range(6)]
        seen |= {f.result(10) for f in futs}
    assert seen == {"0", "1"}
    proc.terminate()
    assert proc.wait(30) == 0


def test_rtq_status_lists_workers_queues_and_running_tasks(queue, workers, redis_url, tmp_path):
    workers.start("st", task_fn=None, env=ISOLATED, args=("--workers", "1"))
    ex = rtq.Executor(queue, "st", timeout=30)
    gate = tmp_path / "gate"

    def slow():
        task = rtq.current_task()
        task.update(3, 10)
        while not gate.exists():
            time.sleep(0.01)

    running = ex.submit(slow)
    wait_for(lambda: running.progress == (3.0, 10.0), 10, "progress 3/10")
    ex.submit(abs, 1)  # stays queued behind the busy slot
    out = subprocess.run(
        [sys.executable, "-m", "rtq", "status", "--url", redis_url, "--prefix", "test"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    gate.touch()
    assert out.returncode == 0, out.stderr
    assert "workers (1)" in out.stdout and "queues=st" in out.stdout
    assert "st: 1 queued" in out.stdout
    assert running.task_id in out.stdout and "3/10 (30%)" in out.stdout
    running.result(10)
