"""``rtq dashboard`` in a real browser: Chromium driven by Playwright, against real workers.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``; ``.ci/run`` installs it), launched
by Playwright with ``executable_path``: Playwright's own browser download is not used. One
browser serves the module; on a failure the test leaves a screenshot in its temp dir. With
``RTQ_DASHBOARD_SCREENSHOT=docs/dashboard.png`` the main test also writes the README's picture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TESTS, Workers, child_env, wait_for

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("RTQ_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SECRET = "dashboard-test-secret-7c1f9e"
MARKER = "PAYLOAD-CONTENT-4b7d2a9e"  # inside a task's arguments: must never reach the page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Dashboard:
    """A dashboard's URL, its token, and reads of its routes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
        self.base = url.split("?")[0]

    def get(self, path: str, *, token: str | None = "", method: str = "GET") -> tuple[int, bytes]:
        """``(status, body)`` of ``path`` with the token (``token=None``: without; else that one)."""
        given = self.token if token == "" else token
        query = f"{'&' if '?' in path else '?'}token={urllib.parse.quote(given)}" if given is not None else ""
        request = urllib.request.Request(self.base + path.lstrip("/") + query, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def state(self) -> dict[str, Any]:
        status, body = self.get("api/state")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def first_event(self) -> bytes:
        """The event stream up to its first board."""
        with urllib.request.urlopen(f"{self.base}events?token={self.token}", timeout=10) as reply:
            got = b""
            while b"\ndata: " not in got and not got.startswith(b"data: "):
                got += reply.read1(65536)
            while not got.endswith(b"\n\n"):
                got += reply.read1(65536)
            return got


@pytest.fixture
def dashboard(redis_url: str, workers: Workers) -> Iterator[Dashboard]:
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]), "RTQ_SECRET": SECRET}
    command = ["dashboard", "--url", redis_url, "--prefix", "test", "--port", "0", "--refresh", "0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtq", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield Dashboard(found.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _serving(workers: Workers, count: int) -> None:
    for _ in range(count):
        workers.start("dash", task_fn=None, env={"RTQ_SECRET": SECRET})


def test_page_shows_workers_queues_progress_output_and_failures_live(
    browser: Any, dashboard: Dashboard, workers: Workers, redis_url: str, tmp_path: Path
) -> None:
    import rtq
    from dashfns import fail_loudly, steps

    _serving(workers, 2)
    queue = rtq.connect(redis_url, "test", secret=SECRET)
    stop = tmp_path / "stop"
    responses: list[Any] = []
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    page.on("response", lambda response: responses.append(response))
    try:
        with rtq.Executor(queue, "dash") as ex:
            running = ex.submit(steps, str(stop), {"name": "demo", "marker": MARKER})
            page.goto(dashboard.url)
            page.evaluate("() => { window.notReloaded = true; }")
            page.wait_for_function(
                "() => document.querySelectorAll('#workers [data-worker]').length === 2", timeout=30_000
            )
            page.wait_for_selector('#queues [data-queue="dash"]', timeout=30_000)
            task = page.locator(f'#running [data-task="{running.task_id}"]')
            task.wait_for(timeout=30_000)
            assert task.locator(".label").inner_text().startswith("steps(")
            page.wait_for_function(
                f"""() => {{
                    const cell = document.querySelector('[data-task="{running.task_id}"] .progress');
                    return cell && Number(cell.dataset.current) >= 1;
                }}""",
                timeout=30_000,
            )
            first = float(task.locator(".progress").get_attribute("data-current") or 0)
            page.wait_for_function(
                f"""() => Number(document.querySelector('[data-task="{running.task_id}"] .progress')
                        .dataset.current) > {first}""",
                timeout=30_000,
            )
            second = float(task.locator(".progress").get_attribute("data-current") or 0)
            assert second > first
            # The last line it printed, as of this progress (it prints before each report).
            wait_for(
                lambda: (
                    f"step {int(second) - 1} of demo" in task.locator(".lines").inner_text()
                    or f"step {int(second)} of demo" in task.locator(".lines").inner_text()
                ),
                20,
                "the task's last printed line on the page",
            )
            assert "no GPU" in page.locator("#workers").inner_text()  # these workers have no NVML
            failed = ex.submit(fail_loudly, "no such file")
            with pytest.raises(ValueError):
                failed.result(timeout=60)
            row = page.locator(f'#failures [data-failed="{failed.task_id}"]')
            row.wait_for(timeout=30_000)
            assert "ValueError: dashboard check: no such file" in row.inner_text()
            row.locator("button").click()
            page.wait_for_function("() => document.querySelector('#traceback').textContent.includes('Traceback')")
            traceback = page.locator("#traceback").inner_text()
            assert "in inner" in traceback and "in fail_loudly" in traceback, traceback
            assert page.evaluate("() => window.notReloaded") is True  # all of it arrived without a reload
            if os.environ.get("RTQ_DASHBOARD_SCREENSHOT"):
                page.locator("#detail-close").click()
                page.screenshot(path=os.environ["RTQ_DASHBOARD_SCREENSHOT"], full_page=True)
            stop.touch()
            assert running.result(timeout=60) >= 2
        bodies = [r.body() for r in responses if r.request.resource_type != "eventsource"]
    except BaseException:
        stop.touch()  # the running task ends, and the executor with it
        page.screenshot(path=str(tmp_path / "dashboard-failure.png"), full_page=True)
        raise
    finally:
        page.close()
    # Nothing the page loaded, nor the stream and the API, holds a secret or a payload.
    assert {urllib.parse.urlsplit(r.url).path for r in responses} >= {"/", "/static/dashboard.js", "/api/error"}
    bodies += [dashboard.first_event(), dashboard.get("api/state")[1]]
    bodies.append(dashboard.get(f"api/error?id={failed.task_id}")[1])
    password = urllib.parse.urlsplit(redis_url).password
    for body in bodies:
        for secret in filter(None, (SECRET, password, MARKER)):
            assert secret.encode() not in body, (secret, body[:300])


def test_gpus_show_as_memory_and_load_bars_and_unknown_record_fields_stay_out(
    browser: Any, dashboard: Dashboard, r: Any
) -> None:
    # A record as a worker on a GPU machine writes it (see rtq.worker.metrics), plus what no
    # rtq writes: the page shows the fields it knows, of the types it expects, and nothing else.
    gpu = {"index": 3, "name": "NVIDIA H200", "memory_used": 70 * 2**30, "memory_total": 140 * 2**30}
    record = {
        "host": "gpu-box-1",
        "pid": 4242,
        "queues": ["gpu"],
        "workers": 1,
        "beat": time.time(),
        "gpu_metrics": [{**gpu, "utilization": 91, "temperature": 66, "serial": "S3CR3T-SERIAL"}],
        "note": MARKER,
    }
    r.zadd("test|task-queue|workers", {"gpu-worker": time.time() + 600})
    r.set("test|task-queue|worker:gpu-worker", json.dumps(record), ex=600)
    shown = dashboard.state()["workers"][0]
    assert shown["gpu_metrics"] == [{**gpu, "utilization": 91, "temperature": 66}]
    assert "note" not in shown
    page = browser.new_page()
    try:
        page.goto(dashboard.url)
        row = page.locator('#workers [data-worker="gpu-worker"] [data-gpu="3"]')
        row.wait_for(timeout=30_000)
        text = row.inner_text()
        assert "GPU 3 NVIDIA H200" in text and "70.0 GiB / 140.0 GiB" in text and "91% busy, 66°C" in text
        widths = row.locator(".bar > span").evaluate_all("spans => spans.map(s => s.style.width)")
        assert widths == ["50%", "91%"]
        assert MARKER not in page.content() and "S3CR3T" not in page.content()
    finally:
        page.close()


def test_every_route_but_static_files_needs_the_token_and_nothing_writes(dashboard: Dashboard) -> None:
    for path in ("", "events", "api/state", "api/error?id=x"):
        for token in (None, "wrong-token", dashboard.token[:-1]):
            status, body = dashboard.get(path, token=token)
            assert status == 403, (path, token, status)
            assert b"needs the token" in body
    assert dashboard.get("")[0] == 200
    assert dashboard.get("api/state")[0] == 200
    assert dashboard.get("static/dashboard.js", token=None)[0] == 200  # shipped code, no data
    assert dashboard.get("api/state", method="POST")[0] == 405  # read-only
    assert dashboard.get("api/state", method="POST", token=None)[0] == 403


def test_listening_beyond_loopback_warns(redis_url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtq", "dashboard", "--url", redis_url, "--host", "0.0.0.0", "--port", "0"],
        env={**child_env(), "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        warning = proc.stderr.readline()
        assert "WARNING: listening on 0.0.0.0" in warning, warning
        assert "token=" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_in_a_notebook_it_shows_the_connection_in_the_cell_and_stops_with_the_kernel(
    workers: Workers, redis_url: str
) -> None:
    from test_magic import Kernel, _client, _kernel_env, errors

    workers.start("nb", task_fn=None, prefix="nbdash")
    client = _client()
    with client.setup_kernel(env=_kernel_env()):
        kernel = Kernel(client)
        kernel.run("%load_ext rtq")
        kernel.run(f"%rtq connect {redis_url} --prefix nbdash")
        cell = kernel.run("import rtq\nboard = rtq.dashboard()")
        assert not errors(cell), cell.outputs
        shown = "".join(o.data.get("text/html", "") for o in cell.outputs if o.output_type == "display_data")
        url = re.search(r'src="(http://127\.0\.0\.1:\d+/\?token=[^"]+)"', shown)
        assert url and "<iframe" in shown and "rtq dashboard</a>" in shown, shown
        page = Dashboard(url.group(1).replace("&amp;", "&"))
        state = page.state()
        assert [w["queues"] for w in state["workers"]] == [["nb"]]  # the %rtq connect prefix's worker
        assert state["prefix"] == "nbdash" and "127.0.0.1" in state["where"]
        password = urllib.parse.urlsplit(redis_url).password
        assert password is None or (password not in state["where"] and "***" in state["where"])
        assert kernel.value("rtq.dashboard(show=False) is board") == "True"  # the running one, not another
    # The kernel is gone, and its dashboard with it.
    wait_for(lambda: _refused(page.base), 30, "the kernel's dashboard to stop")


def _refused(base: str) -> bool:
    try:
        urllib.request.urlopen(base, timeout=2)
    except urllib.error.HTTPError:
        return False  # still answering (403: no token)
    except OSError:
        return True
    return False


class Holder:
    """An actor holding 3 MiB under the name ``weights``."""

    def __init__(self) -> None:
        self.weights = bytearray(3 * 2**20)

    def grow(self) -> int:
        self.extra = list(range(10))
        return len(self.weights)


def test_sessions_panel_lists_each_actor_where_it_lives_and_what_it_holds(
    browser: Any, dashboard: Dashboard, workers: Workers, redis_url: str
) -> None:
    import rtq

    _serving(workers, 1)
    queue = rtq.connect(redis_url, "test", secret=SECRET)
    page = browser.new_page()
    try:
        with rtq.Executor(queue, "dash") as ex, ex.actor(Holder) as holder:
            page.goto(dashboard.url)
            row = page.locator(f'#sessions [data-session="{holder.session.id}"]')
            row.wait_for(timeout=30_000)
            text = row.inner_text()
            assert "Holder" in text and "actor" in text and holder.session.host in text, text
            assert "weights bytearray, 3.0 MiB" in row.locator('[data-name="weights"]').inner_text()
            assert holder.grow().result(30) == 3 * 2**20
            row.locator('[data-name="extra"]').wait_for(timeout=30_000)  # a later call's names show up live
            assert page.locator("#sessions .count").inner_text() == "(1)"
        page.wait_for_function("() => !document.querySelector('#sessions [data-session]')", timeout=30_000)
        assert "no session or actor" in page.locator("#sessions").inner_text()
    finally:
        page.close()
