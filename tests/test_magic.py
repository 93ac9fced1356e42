"""The ``%%rtq`` cell magic and ``%rtq`` line magic, in a real IPython kernel driven by nbclient.

One kernel serves the module (starting one costs seconds); each test starts its own worker
subprocess on queue ``cells`` against the session's Redis and connects the kernel to it.
"""

from __future__ import annotations

import ast
import asyncio
import html
import os
import re
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import redis
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

from conftest import Workers, child_env, wait_for

pytestmark = pytest.mark.timeout(120)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Kernel:
    """A live kernel: run cells, read what they showed."""

    def __init__(self, client: NotebookClient) -> None:
        self.client = client
        self.nb = client.nb

    def run(self, source: str) -> Any:
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell

    def connect(self, url: str) -> None:
        cell = self.run(f"%rtq connect {url}")
        assert not errors(cell), errors(cell)

    def value(self, source: str) -> str:
        """The text/plain of a cell's result (the cell must succeed)."""
        cell = self.run(source)
        assert not errors(cell), (source, errors(cell), streams(cell))
        return result(cell).get("text/plain", "")


def streams(cell: Any, name: str | None = None) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and name in (None, o.name))


def errors(cell: Any) -> list[Any]:
    return [o for o in cell.outputs if o.output_type == "error"]


def usage_error(cell: Any) -> str:
    """The message of the UsageError a cell raised (IPython prints those on stderr)."""
    text = streams(cell, "stderr")
    assert text.startswith("UsageError: "), (text, cell.outputs)
    return text


def traceback_text(cell: Any) -> str:
    return _ANSI.sub("", "\n".join(line for err in errors(cell) for line in err.traceback))


def result(cell: Any) -> dict[str, Any]:
    for o in cell.outputs:
        if o.output_type == "execute_result":
            return dict(o.data)
    return {}


def _client() -> NotebookClient:
    return NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3", timeout=60, allow_errors=True)


def _kernel_env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    client = _client()
    with client.setup_kernel(env=_kernel_env()):
        k = Kernel(client)
        cell = k.run("%load_ext rtq")
        assert not cell.outputs, cell.outputs
        yield k


@pytest.fixture
def cells(kernel: Kernel, workers: Workers, redis_url: str) -> Kernel:
    """The kernel, connected, with a worker serving queue ``cells``."""
    workers.start("cells", task_fn=None, prefix="rtq")
    kernel.connect(redis_url)
    return kernel


def test_variables_round_trip(cells: Kernel) -> None:
    cells.run("a = 21\nimport math, threading\nunread = threading.Lock()")  # unshippable, but not read
    cell = cells.run("%%rtq cells\nb = a * 2\nc = math.sqrt(b)\nimport os\npid = os.getpid()")
    assert not errors(cell), traceback_text(cell)
    assert not result(cell)  # no bare expression at the end: nothing displayed
    assert cells.value("b, round(c, 3), type(math).__name__") == "(42, 6.481, 'module')"
    assert cells.value("import os\npid != os.getpid()") == "True"  # it did run elsewhere
    # Names assigned before they are read are not shipped: the worker's fresh value wins.
    cells.run("b = 'stale'")
    assert cells.value("%%rtq cells\nb = 5\nb * 2") == "10"


def test_push_and_pull_override_the_analysis(cells: Kernel) -> None:
    cells.run("a, b = 1, 2")
    cell = cells.run(
        "%%rtq cells --push a --pull c\ntry:\n    b\nexcept NameError:\n    c = a * 100\nelse:\n    c = -1\nd = 5"
    )
    assert not errors(cell), traceback_text(cell)
    assert cells.value("c") == "100"  # b was not shipped
    assert cells.value("'d' in dir()") == "False"  # d was not pulled
    assert "nosuchvar" in usage_error(cells.run("%%rtq cells --push nosuchvar\n1"))


def test_last_expression_is_displayed_with_rich_reprs(cells: Kernel) -> None:
    cell = cells.run(
        "%%rtq cells\n"
        "class Frame:\n"
        "    def __repr__(self):\n"
        "        return 'Frame(2 rows)'\n"
        "    def _repr_html_(self):\n"
        "        return '<table><tr><td>1</td></tr></table>'\n"
        "Frame()"
    )
    assert not errors(cell), traceback_text(cell)
    data = result(cell)
    assert data["text/plain"] == "Frame(2 rows)"
    assert data["text/html"] == "<table><tr><td>1</td></tr></table>"
    # A value that cannot travel back is still displayed, from reprs made on the worker.
    cell = cells.run(
        "%%rtq cells\nimport threading\nclass Held:\n    def _repr_html_(self):\n        return '<b>held</b>'\n"
        "    def __init__(self):\n        self.lock = threading.Lock()\nHeld()"
    )
    assert not errors(cell), traceback_text(cell)
    assert result(cell)["text/html"] == "<b>held</b>"
    # A trailing semicolon silences the display, as in any cell.
    cell = cells.run("%%rtq cells\n6 * 7;")
    assert not errors(cell) and not result(cell)


def test_exception_keeps_its_type_and_shows_the_cells_line(cells: Kernel) -> None:
    cell = cells.run("%%rtq cells\nx = 1\ny = x / 0\n")
    (err,) = errors(cell)
    assert err.ename == "ZeroDivisionError"
    tb = traceback_text(cell)
    assert "----> 3 y = x / 0" in tb, tb  # the cell's own line, numbered as in the notebook
    assert "      1 %%rtq cells" in tb
    assert "raised in the %%rtq cell on worker" in tb
    assert "magic.py" not in tb  # no frames of the machinery
    # A function defined in the cell fails inside: both frames point at the cell.
    cell = cells.run("%%rtq cells\ndef f(n):\n    return 1 / n\n\nf(0)")
    tb = traceback_text(cell)
    assert errors(cell)[0].ename == "ZeroDivisionError"
    assert "----> 5 f(0)" in tb and "----> 3     return 1 / n" in tb, tb
    assert cells.value("isinstance(sys.last_value, ZeroDivisionError) if (sys := __import__('sys')) else 0") == "True"


def test_traceback_names_the_cell_as_ipython_does(cells: Kernel) -> None:
    """IPython 9 counts a cell before it runs: the magic must not name the next one."""
    local = cells.run("x = 0\n1 / x")
    assert f"Cell In[{local.execution_count}], line 2" in traceback_text(local)  # IPython's own naming
    cell = cells.run("%%rtq cells\nx = 1\ny = x / 0\n")
    tb = traceback_text(cell)
    assert f"Cell In[{cell.execution_count}], line 3" in tb, tb


@pytest.mark.skipif(
    not os.environ.get("RTQ_TEST_IPYTHON8"), reason="set RTQ_TEST_IPYTHON8 (see Makefile: test-ipython8)"
)
def test_traceback_names_the_cell_on_ipython_8(workers: Workers, redis_url: str) -> None:
    """The same mechanism on IPython 8, which counts a cell after it ran (``make test-ipython8``)."""
    workers.start("cells", task_fn=None, prefix="rtq")
    path = os.pathsep.join([os.environ["RTQ_TEST_IPYTHON8"], os.environ.get("PYTHONPATH", "")])
    client = _client()
    with client.setup_kernel(env=_kernel_env(PYTHONPATH=path)):
        k = Kernel(client)
        assert k.value("import IPython; IPython.version_info[0]") == "8"
        k.run("%load_ext rtq")
        k.connect(redis_url)
        k.run("def helper(x):\n    return 1 / x")
        helper = k.nb.cells[-1]
        cell = k.run("%%rtq cells\nx = 0\ny = helper(x)\n")
        tb = traceback_text(cell)
        assert f"Cell In[{cell.execution_count}], line 3" in tb, tb
        assert f"Cell In[{helper.execution_count}], line 2, in helper" in tb, tb


def test_a_helper_from_an_earlier_cell_shows_that_cell(cells: Kernel) -> None:
    """Code shipped by value keeps its cell's name and lines: traceback and warnings show them."""
    helper = cells.run("import warnings\ndef helper(x):\n    warnings.warn('careful')\n    return 1 / x")
    cell = cells.run("%%rtq cells\ny = helper(0)")
    tb = traceback_text(cell)
    assert errors(cell)[0].ename == "ZeroDivisionError"
    assert f"Cell In[{helper.execution_count}], line 4, in helper" in tb, tb
    assert "----> 4     return 1 / x" in tb and "<dynamic-code>" not in tb, tb
    # The warning, printed on the worker, names the helper's cell file and shows its line.
    filename = cells.value("helper.__code__.co_filename").strip("'")
    warning = streams(cell, "stderr")
    assert f"{filename}:3: UserWarning: careful" in warning, warning
    assert "warnings.warn('careful')" in warning and "<dynamic-code>" not in warning, warning


def test_a_comprehension_does_not_print_the_cells_frame_twice(cells: Kernel) -> None:
    cell = cells.run("%%rtq cells\ny = 2\ntotal = [1 / (i - i) for i in range(y)]")
    tb = traceback_text(cell)
    assert errors(cell)[0].ename == "ZeroDivisionError"
    assert tb.count("----> 3 total = [1 / (i - i) for i in range(y)]") == 1, tb
    cell = cells.run("%%rtq cells\ny = 2\ntotal = sum(1 / (i - i) for i in range(y))")
    assert traceback_text(cell).count("----> 3 total = sum(") == 1, traceback_text(cell)


def test_an_executor_error_shows_the_users_frames_and_the_worker(cells: Kernel, redis_url: str) -> None:
    """fut.result() in a cell: the cells' frames, then the worker; no rtq or futures internals."""
    cells.run(f"import rtq\nq = rtq.connect({redis_url!r})\nex = rtq.Executor(q, 'cells')")
    helper = cells.run("def helper(x):\n    return 1 / x")
    caller = cells.run("import warnings\ndef bad(n):\n    warnings.warn('watch out')\n    return helper(n)")
    cell = cells.run("fut = ex.submit(bad, 0)\nfut.result(30)")
    tb = traceback_text(cell)
    assert errors(cell)[0].ename == "ZeroDivisionError"
    assert f"Cell In[{cell.execution_count}], line 2" in tb and "----> 2 fut.result(30)" in tb, tb
    assert f"Cell In[{caller.execution_count}], line 4, in bad" in tb, tb
    assert f"Cell In[{helper.execution_count}], line 2, in helper" in tb and "----> 2     return 1 / x" in tb, tb
    assert re.search(r"ZeroDivisionError: division by zero\n\(raised on worker \S+, pid \d+\)", tb), tb
    for internal in ("listener.py", "calls.py", "concurrent/futures", "<dynamic-code>", "Remote traceback"):
        assert internal not in tb, (internal, tb)
    # What the task printed on the worker (here its warning) names the cell and shows the line.
    cell = cells.run(
        "from rtq.watch import watch\nseen = []\nwatch(fut, on_output=lambda s, t: seen.append(t), timeout=30)\n"
        "print(''.join(seen))"
    )
    filename = cells.value("bad.__code__.co_filename").strip("'")
    out = streams(cell, "stdout")
    assert f"{filename}:3: UserWarning: watch out" in out and "warnings.warn('watch out')" in out, out


def test_no_wait_returns_a_handle_and_variables_arrive_on_wait(cells: Kernel) -> None:
    cell = cells.run("%%rtq cells --no-wait -o job\nz = 7\nz * 6")
    assert not errors(cell), traceback_text(cell)
    assert "%rtq wait job" in streams(cell, "stdout")
    assert not result(cell)  # the handle is in `job`, said once: not also shown as Out[n]
    assert cells.value("type(job).__mro__[1].__name__") == "'TaskFuture'"
    assert cells.value("'z' in dir()") == "False"  # nothing arrives behind the user's back
    assert cells.value("%rtq wait job") == "42"
    assert cells.value("z") == "7"
    # The other way to wait: the handle's result().
    cells.run("%%rtq cells --no-wait -o job2\nw = 3")
    assert cells.value("job2.result(30), w") == "(None, 3)"
    # Without -o the handle is the cell's value (Out[n]), and only that.
    cell = cells.run("%%rtq cells --no-wait\nv = 5")
    assert not streams(cell) and "%%rtq cell In[" in result(cell)["text/plain"], cell.outputs
    # A failed --no-wait cell raises its own exception when waited on.
    cells.run("%%rtq cells --no-wait -o job3\n[][1]")
    cell = cells.run("%rtq wait job3")
    assert errors(cell)[0].ename == "IndexError"
    assert "----> 2 [][1]" in traceback_text(cell)


def test_unpicklable_variable_is_named(cells: Kernel) -> None:
    cells.run("import threading\nlock = threading.Lock()")
    cell = cells.run("%%rtq cells\nlock.locked()")
    (err,) = errors(cell)
    assert err.ename == "SerializationError"
    assert "variable 'lock'" in err.evalue and "_thread.lock" in err.evalue


def test_size_warning_names_the_variable(cells: Kernel) -> None:
    cells.run("big = bytes(2_000_000)\nsmall = 1")
    cell = cells.run("%%rtq cells --size-warn 1MB\nn = len(big) + small")
    assert not errors(cell), traceback_text(cell)
    warning = streams(cell, "stderr")
    assert "'big'" in warning and "2.0 MB" in warning and "'small'" not in warning
    assert cells.value("n") == "2000001"


def test_variables_are_pickled_once_and_shared_objects_stay_shared(cells: Kernel) -> None:
    """The size check's pickle is the one that ships; a model and its optimizer share weights."""
    cells.run(
        "import os\n"
        "class Counted:  # counts its pickles in this process's environment, which does not travel\n"
        "    def __reduce__(self):\n"
        "        os.environ['RTQ_TEST_PICKLES'] = str(int(os.environ.get('RTQ_TEST_PICKLES', '0')) + 1)\n"
        "        return (Counted, ())\n"
        "weights = [1.0, 2.0]\n"
        "model = {'weights': weights, 'probe': Counted()}\n"
        "opt = {'params': weights}"
    )
    cell = cells.run(
        "%%rtq cells\nopt['params'].append(3.0)\nshared = model['weights'] is opt['params']\nmodel, opt = model, opt"
    )
    assert not errors(cell), traceback_text(cell)
    assert cells.value("os.environ['RTQ_TEST_PICKLES']") == "'1'"
    assert cells.value("shared, model['weights'], model['weights'] is opt['params']") == "(True, [1.0, 2.0, 3.0], True)"


def test_prints_appear_in_the_cell(cells: Kernel) -> None:
    cell = cells.run("%%rtq cells\nprint('hello from', 'the worker')\nimport sys\nprint('oops', file=sys.stderr)")
    assert not errors(cell), traceback_text(cell)
    assert streams(cell, "stdout") == "hello from the worker\n"
    assert streams(cell, "stderr") == "oops\n"


def test_usage_errors(cells: Kernel) -> None:
    message = usage_error(cells.run("%%rtq cells --bogus\n1"))
    assert "--bogus" in message and "usage: %%rtq" in message
    message = usage_error(cells.run("%%rtq nosuchqueue\n1"))
    assert "no worker listens on queue 'nosuchqueue'" in message and "cells" in message
    assert "frobnicate" in usage_error(cells.run("%rtq frobnicate"))
    for bad in ("0", "-1", "nan", "inf"):
        message = usage_error(cells.run(f"%%rtq cells --timeout {bad}\n1"))
        assert f"--timeout must be a finite number of seconds above zero, not {bad}" in message
    assert "cannot reach Redis" in usage_error(cells.run("%rtq connect redis://127.0.0.1:1/0"))
    assert cells.value("%%rtq cells\n'still connected'") == "'still connected'"  # the old session stays
    cell = cells.run("%%rtq cells --timeout 0.5\nimport time\nfor i in range(3000):\n    time.sleep(0.01)")
    assert errors(cell)[0].ename == "TaskTimeout"
    cell = cells.run("%%rtq cells\nx = (1,\n")
    assert errors(cell)[0].ename == "SyntaxError"
    assert "x = (1," in traceback_text(cell)


def test_status(cells: Kernel) -> None:
    cell = cells.run("%rtq status")
    assert not errors(cell)
    out = streams(cell)
    assert "queues=cells" in out and "workers (1)" in out
    assert "no GPU" in out and "rss " in out  # the worker's machine, as its heartbeat says (no NVML here)


def test_connect_without_url_starts_embedded_server_and_local_worker(tmp_path: Any) -> None:
    client = _client()
    with client.setup_kernel(env=_kernel_env()):
        k = Kernel(client)
        k.run("%load_ext rtq")
        assert "%rtq connect" in usage_error(k.run("%%rtq\n1"))
        cell = k.run("%rtq connect")
        assert not errors(cell), traceback_text(cell)
        out = streams(cell)
        assert "embedded server" in out and "local worker" in out, out
        pid = int(re.search(r"pid (\d+)", out).group(1))  # type: ignore[union-attr]
        # The server's password is in neither what the cell shows nor the worker's command line.
        password = ast.literal_eval(k.value("import rtq.server\nrtq.server._default.password"))
        assert "redis://:***@127.0.0.1:" in out and password not in out, out
        assert password not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        assert k.value("%%rtq\nimport os\nos.getpid()") == str(pid)
        run_sync(client.km.shutdown_kernel)(now=False)  # a clean exit runs the kernel's atexit

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, 30, "the local worker to stop with the kernel")


def test_connect_names_a_bad_url_without_its_password(kernel: Kernel) -> None:
    text = usage_error(kernel.run("%rtq connect redis://:hunter2@127.0.0.1:1/0?socket_timeout=abc"))
    assert "redis://:***@127.0.0.1:1/0" in text and "socket_timeout" in text and "hunter2" not in text, text


def bar_of(kernel: Kernel, cell: Any) -> dict[str, Any]:
    """The bar a ``%%rtq`` cell showed: where it sits, its widgets' states, what the notebook keeps.

    Returns {} when the cell showed none. While the cell runs its output is the widget; once it
    ended, a still picture of it (``text/html`` and ``text/plain``), kept by a saved notebook.
    """
    shown = [
        i
        for i, o in enumerate(cell.outputs)
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        or "rtq-progress" in o.get("data", {}).get("text/html", "")
    ]
    if not shown:
        return {}
    states = {k: dict(v) for k, v in list(kernel.client.widget_state.items())}  # copies: another thread may update
    label = f">%%rtq cell In[{cell.execution_count}]</span>"
    labels = [k for k, m in states.items() if label in str(m.get("value", ""))]
    parents = {str(c)[len("IPY_MODEL_") :]: k for k, m in states.items() for c in m.get("children", [])}
    root = labels[0]
    while root in parents:  # up to the view's box, then everything in it
        root = parents[root]
    mine, pending = {}, [root]
    while pending:
        model_id = pending.pop()
        mine[model_id] = states.get(model_id, {})
        pending += [str(c)[len("IPY_MODEL_") :] for c in mine[model_id].get("children", [])]
    html_ = " ".join(m.get("value", "") for m in mine.values() if m.get("_model_name") == "HTMLModel")
    bars = [m for m in mine.values() if m.get("_model_name") == "FloatProgressModel"]
    return {"position": shown[0], "output": cell.outputs[shown[0]], "bars": bars, "html": html.unescape(html_)}


LOOP = (
    "import time, rtq\ntask = rtq.current_task()\nfor i in range(1, 21):\n    time.sleep(0.05)\n    task.update(i, 20)"
)


def test_progress_bar_appears_after_progress_after(cells: Kernel) -> None:
    cell = cells.run(f"%%rtq cells --progress-after 0.3\nprint('before the bar')\n{LOOP}\nprint('after it')")
    assert not errors(cell), traceback_text(cell)
    bar = bar_of(cells, cell)
    assert bar and bar["position"] == 0, cell.outputs  # rtq.progress's widget, above the cell's output
    assert streams(cell) == "before the bar\nafter it\n"  # `task` (a RedisTask) quietly stays on the worker
    (gauge,) = bar["bars"]
    assert gauge["value"] == gauge["max"] == 20 and gauge["bar_style"] == "success", gauge
    assert re.search(r"20/20 \[00:0\d<00:00, +[\d.]+it/s\]", bar["html"]), bar["html"]
    # Ended, the widget (the live view) gave way to a still picture, which a saved notebook keeps.
    kept = bar["output"].data
    assert "application/vnd.jupyter.widget-view+json" not in kept, kept
    assert f"%%rtq cell In[{cell.execution_count}]: 100%" in kept["text/plain"] and "20/20 [" in kept["text/plain"]
    assert "20/20 [" in kept["text/html"] and "#4caf50" in kept["text/html"], kept  # green
    # A cell that ends before --progress-after shows no bar.
    cell = cells.run(f"%%rtq cells --progress-after 30\n{LOOP}")
    assert not errors(cell), traceback_text(cell)
    assert not bar_of(cells, cell), cell.outputs


def test_the_bar_turns_red_on_an_error_and_says_why(cells: Kernel) -> None:
    failing = LOOP + "\n    if i == 10:\n        1 / 0"
    cell = cells.run(f"%%rtq cells --progress-after 0.2\n{failing}")
    assert errors(cell)[0].ename == "ZeroDivisionError"
    bar = bar_of(cells, cell)
    (gauge,) = bar["bars"]
    assert 5 <= gauge["value"] <= 10 and gauge["bar_style"] == "danger", (
        gauge
    )  # where it stopped (reports are 0.1 s apart)
    assert "failed: ZeroDivisionError: division by zero" in bar["html"], bar["html"]


def test_text_bars_where_widgets_are_off(cells: Kernel) -> None:
    cells.run("import os\nos.environ['RTQ_PROGRESS'] = 'text'")
    try:
        cell = cells.run(f"%%rtq cells --progress-after 0.3\nprint('before the bar')\n{LOOP}")
    finally:
        cells.run("del os.environ['RTQ_PROGRESS']")
    assert not errors(cell), traceback_text(cell)
    assert not bar_of(cells, cell)
    first = cell.outputs[0]
    assert first.output_type == "display_data" and "20/20 [" in first.data["text/plain"], cell.outputs
    assert streams(cell) == "before the bar\n"


def test_interrupt_stops_the_remote_cell(cells: Kernel, r: redis.Redis) -> None:
    cell = nbformat.v4.new_code_cell(
        "%%rtq cells -o slow --progress-after 0.2\nimport time, rtq\n"
        "for i in rtq.tqdm(range(3000)):\n    time.sleep(0.01)\nended = True"
    )
    cells.nb.cells.append(cell)

    def execute() -> None:  # in a thread with its own event loop, closed after (no leaked loop)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(cells.client.async_execute_cell(cell, len(cells.nb.cells) - 1))
        finally:
            loop.close()

    runner = threading.Thread(target=execute)
    runner.start()
    try:

        def running() -> bool:
            bars = bar_of(cells, cell).get("bars", [])  # the bar is up: the cell runs on the worker
            return bool(bars) and bars[0].get("value", 0) > 0

        wait_for(running, 30, "the cell's bar to move")
        run_sync(cells.client.km.interrupt_kernel)()
    finally:
        runner.join(60)
    assert not runner.is_alive()
    (err,) = errors(cell)
    assert err.ename == "KeyboardInterrupt"
    assert "stopped the remote cell" in traceback_text(cell), traceback_text(cell)
    bar = bar_of(cells, cell)
    (gauge,) = bar["bars"]
    assert gauge["bar_style"] == "danger" and 0 < gauge["value"] < 3000 and "interrupted" in bar["html"], bar
    # The worker stopped the cell (it would otherwise run for 30 s) and the kernel knows it.
    worker_ids = [w.decode() for w in r.zrange("rtq|task-queue|workers", 0, -1)]
    wait_for(lambda: all(r.llen(f"rtq|task-queue|task-running|{w}") == 0 for w in worker_ids), 15, "the stop")
    assert cells.value("type(slow.exception(10)).__name__") == "'TaskCancelled'"
    assert cells.value("'ended' in dir()") == "False"
    # The next cell runs at once.
    assert cells.value("%%rtq cells\n1 + 1") == "2"


def test_status_lists_running_tasks_by_what_they_run(cells: Kernel, redis_url: str, tmp_path: Any) -> None:
    flag = str(tmp_path / "go")
    wait = f"import os, time\nwhile not os.path.exists({flag!r}):\n    time.sleep(0.05)"
    cells.run(f"%%rtq cells --no-wait -o quiet\n{wait}")
    quiet = cells.nb.cells[-1]
    body = textwrap.indent(f"task = rtq.current_task()\ntask.update(3, epochs)\n{wait}", "    ")
    cells.run(
        f"import rtq\nq = rtq.connect({redis_url!r})\nex = rtq.Executor(q, 'cells')\n"
        f"def train(epochs):\n{body}\nfut = ex.submit(train, 12)"
    )
    try:

        def listed() -> str:
            out = streams(cells.run("%rtq status"))
            return out if "running tasks (2)" in out and "train(12)  on cells  3/12 (25%)" in out else ""

        out = str(wait_for(listed, 30, "both tasks to run and report"))
        line = next(ln for ln in out.splitlines() if f"%%rtq cell In[{quiet.execution_count}]" in ln)
        assert re.search(r"  on cells  no progress reported  running \d+s  worker \S+  task [0-9a-f]{32}$", line), out
        assert "0/100" not in out, out
    finally:
        open(flag, "w").close()
    assert cells.value("fut.result(30), quiet.result(30)") == "(None, None)"


def test_a_cell_run_again_on_an_unchanged_big_array_ships_only_digests(cells: Kernel, r: redis.Redis) -> None:
    size = 256 * 2**20
    cells.run(f"import numpy\nbig = numpy.random.default_rng(0).integers(0, 255, size={size}, dtype=numpy.uint8)")

    def sent() -> int:
        return int(r.info("stats")["total_net_input_bytes"])

    shipped = []
    for _ in range(2):
        before = sent()
        cell = cells.run("%%rtq cells --size-warn 1GB\nn = len(big)")
        shipped.append(sent() - before)
        assert not errors(cell), traceback_text(cell)
        assert cells.value("n") == str(size)
    assert shipped[0] > size and shipped[1] < 2**20, shipped  # the second run sent its digest only
    cells.run("big[0] += 1")  # changed: a new buffer, sent whole
    before = sent()
    assert not errors(cells.run("%%rtq cells --size-warn 1GB\nn = int(big[0])")), "changed array"
    assert sent() - before > size
    cells.run("del big")
