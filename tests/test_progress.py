"""Progress and output (issue 6): rtq.tqdm, task.update throttling, streamed output, rtq.progress."""

from __future__ import annotations

import html
import io
import os
import re
import struct
import subprocess
import sys
import time

import pytest
import tqdm.std

import progressfns
import rtq
from conftest import TESTS, child_env, wait_for
from rtq import display
from rtq.task import PROGRESS_INTERVAL, RedisTask
from rtq.textview import Screen
from rtq.watch import Follower, watch


@pytest.fixture(autouse=True)
def no_leaked_bars():
    """Fails a test that leaves a tqdm bar open (as tqdm's own test suite does)."""
    yield
    leaked = list(getattr(tqdm.std.tqdm, "_instances", ()))
    for bar in leaked:
        bar.close()
    assert not leaked, f"open tqdm bars left behind: {leaked}"


@pytest.fixture
def ex(queue, workers):
    workers.start("pq", task_fn=None, args=("--workers", "4"))
    executor = rtq.Executor(queue, "pq", timeout=30)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def follow(fut, **kwargs):
    """Everything ``watch`` reports for ``fut``, in order: ("out"/"err"/"progress"/"state", ...)."""
    seen = []
    state = watch(
        fut,
        on_output=lambda stream, text: seen.append((stream, text)),
        on_progress=lambda cur, total, desc: seen.append(("progress", cur, total, desc)),
        on_state=lambda s: seen.append(("state", s)),
        timeout=30,
        **kwargs,
    )
    return state, seen


def joined(seen, stream):
    return "".join(item[1] for item in seen if item[0] == stream)


# -- inside a task ----------------------------------------------------------------------------
def test_import_rtq_stays_light():
    code = (
        "import sys, rtq\n"
        "heavy = ('IPython', 'ipywidgets', 'tqdm.notebook', 'tqdm')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "rtq.tqdm, rtq.progress\n"  # the lazy exports themselves load no notebook parts
        "print([m for m in heavy[:3] if m in sys.modules])\n"
        "print(issubclass(rtq.tqdm, __import__('tqdm').std.tqdm), callable(rtq.progress))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["[]", "[]", "True True"]


def test_tqdm_outside_a_task_is_a_plain_tqdm_bar():
    sink = io.StringIO()
    bar = rtq.tqdm(range(7), desc="plain", file=sink, mininterval=0)
    assert isinstance(bar, tqdm.std.tqdm)
    assert list(bar) == list(range(7))
    assert "plain: 100%" in sink.getvalue() and "7/7" in sink.getvalue()

    sink = io.StringIO()
    with rtq.tqdm(total=4, file=sink, mininterval=0) as outer:
        for _ in rtq.tqdm(range(3), file=sink, leave=False, mininterval=0):
            pass
        outer.update(4)
        outer.set_description("renamed")
    assert "renamed: 100%" in sink.getvalue() and "4/4" in sink.getvalue()


def test_update_is_throttled_and_the_final_state_always_written():
    written = []
    task = RedisTask("t1", "q", None, expiry=time.time() + 60)
    task._reporter.send = lambda t: written.append((t.current_progress, t.total_progress)) or "running"
    start = time.monotonic()
    for i in range(100_000):
        task.update(i, 100_000)
    task.update(100_000, 100_000)
    elapsed = time.monotonic() - start
    assert written[0] == (0, 100_000)  # the first one
    assert written[-1] == (100_000, 100_000)  # the final one, however soon after the last
    assert len(written) <= elapsed / PROGRESS_INTERVAL + 3


def test_rtq_tqdm_in_a_task_reports_nested_bars_and_descriptions(ex):
    state, seen = follow(ex.submit(progressfns.nested, 3, 4))
    assert state == "done"
    progress = [item for item in seen if item[0] == "progress"]
    assert progress[-1] == ("progress", 3.0, 3.0, "epoch 2")
    assert ("progress", 0.0, 3.0, "epochs") in progress  # the first report, always written
    assert all(p[2] == 3.0 for p in progress if p[2] is not None)  # the outer bar sets the total
    assert seen[-1] == ("state", "done") and "stderr" not in {s[0] for s in seen}  # draws nothing


# -- streamed output --------------------------------------------------------------------------
def test_output_streams_live_in_order_and_before_a_failure(ex, tmp_path, r):
    flag = tmp_path / "go"
    fut = ex.submit(progressfns.chatty_then_fail, str(flag))

    def on_output(stream, text):
        seen.append((stream, text))
        if "ready" in text:
            flag.touch()  # the task goes on only once its first print reached us

    seen: list[tuple[str, str]] = []
    state = watch(fut, on_output=on_output, timeout=30)
    assert state == "failed"
    assert isinstance(fut.exception(10), ValueError)
    out, err = joined(seen, "stdout"), joined(seen, "stderr")
    assert out == "ready\nlast words before the failure\n"
    assert err.index("to stderr") < err.index("a logged warning") < err.index("library bar")
    assert "3/3" in err  # a library's own tqdm bar, as it drew it
    # On the stream, the last output comes before the end: a caller learns it first.
    kinds = [next(iter(f)) for _, f in r.xrange(ex.queue.keys.events(fut.task_id))]
    assert kinds[-1] == b"state" and b"stdout" in kinds[:-1]


def test_parallel_tasks_outputs_do_not_mix(ex):
    futs = [ex.submit(progressfns.interleaved, tag, 60) for tag in ("AAA", "BBB")]
    for tag, fut in zip(("AAA", "BBB"), futs, strict=True):
        state, seen = follow(fut.task_id, queue=ex.queue)  # by id, as any client can
        assert state == "done"
        assert joined(seen, "stdout") == "".join(f"{tag} {i}\n" for i in range(60))
        assert joined(seen, "stderr") == "".join(f"{tag} err {i}\n" for i in range(9, 60, 10))
    assert [f.result(10) for f in futs] == ["AAA", "BBB"]


def test_follower_ends_a_vanished_task_as_lost(queue):
    follower = Follower(["never-submitted"], queue=queue)
    events = []
    wait_for(lambda: events.extend(follower.poll(0.2)) or follower.done, 10, "the follower to give up")
    assert [(e.kind, e.text) for e in events] == [("state", "lost")]


# -- rtq.progress -----------------------------------------------------------------------------
def test_text_bars_reach_100_percent_and_print_the_output(ex, capsys):
    fut = ex.submit(progressfns.counted, 25, "adding")
    view = rtq.progress(fut, mode="text")
    assert view.done and view.states() == {fut.task_id: "done"}
    captured = capsys.readouterr()
    assert "counted(25, 'adding'): 100%" in captured.err and "25/25" in captured.err
    assert captured.err.rstrip().endswith("adding")  # the task's own description, after its counts
    assert captured.out == "counting to 25\ncounted\n"
    assert fut.result(10) == sum(range(25))


def test_many_tasks_show_one_aggregate_bar_and_the_failures(ex, capsys):
    futs = [ex.submit(progressfns.maybe_fail, i) for i in range(25)]
    view = rtq.progress(futs, mode="text")
    assert view.done and len(view.rows) == 1
    err = capsys.readouterr().err
    assert "25/25: 22 done, 3 failed" in err and "25 tasks" in err
    expected = [f"maybe_fail({i}): ValueError: bad {i}" for i in (3, 13, 23)]
    assert sorted(view.failures) == sorted(expected)  # each task by its call
    assert all(line in err for line in expected)
    assert "maybe_fail(0):" not in err  # no bar per task (task 0 succeeded)


def test_terminal_bars_end_in_order_each_frozen_at_its_own_end(tmp_path, redis_url, r, workers):
    """rtq.progress in a plain Python process on a terminal: what the screen shows once all ended."""
    pyte = pytest.importorskip("pyte")
    fcntl, pty, termios = (pytest.importorskip(name) for name in ("fcntl", "pty", "termios"))  # POSIX terminals
    workers.start("pq", task_fn=None, args=("--workers", "3"))
    script = tmp_path / "watch.py"
    script.write_text(
        "import redis, rtq, progressfns\n"
        "from rtq.task_queue import RedisTaskQueue\n"
        f"q = RedisTaskQueue(redis.Redis.from_url({redis_url!r}), 'test', timeout=30)\n"
        "ex = rtq.Executor(q, 'pq')\n"
        "futs = [ex.submit(progressfns.counted, n, 'steps', 0.1) for n in (10, 20, 30)]\n"
        "rtq.progress(futs)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "src")]), "TERM": "xterm"}
    env.pop("RTQ_PROGRESS", None)
    screen = pyte.Screen(120, 40)
    stream = pyte.ByteStream(screen)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            stream.feed(data)
        assert proc.wait(60) == 0, "\n".join(screen.display)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = [line for line in screen.display if re.search(r"(\d+)/\1 \[", line)]
    totals = [int(re.search(r"(\d+)/\1 \[", line).group(1)) for line in shown]  # type: ignore[union-attr]
    assert totals == [10, 20, 30], "\n".join(screen.display)  # as shown while they ran, not reversed
    elapsed = [int(re.search(r"\[00:(\d\d)", line).group(1)) for line in shown]  # type: ignore[union-attr]
    assert elapsed[0] < elapsed[1] < elapsed[2], shown  # each frozen when it ended: 10 steps of 0.1 s first
    assert all("<00:00," in line and "it/s]" in line for line in shown), shown


def test_widget_mode_without_ipywidgets_falls_back_to_text_with_a_hint(ex, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets now fails
    monkeypatch.setattr(display, "_hinted", False)
    monkeypatch.setenv("RTQ_PROGRESS", "widget")
    fut = ex.submit(progressfns.counted, 5)
    view = rtq.progress(fut)
    assert view.mode == "text" and view.done
    err = capsys.readouterr().err
    assert err.startswith(display.INSTALL_HINT + "\n") and "pip install ipywidgets" in err
    assert "5/5" in err


def test_progress_off_shows_nothing_and_bad_modes_are_named(ex, capsys, monkeypatch):
    monkeypatch.setenv("RTQ_PROGRESS", "off")
    fut = ex.submit(progressfns.counted, 5)
    view = rtq.progress(fut)
    assert view.wait(30) and view.states() == {fut.task_id: "done"}
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RTQ_PROGRESS", "fancy")
    with pytest.raises(ValueError, match=r"RTQ_PROGRESS must be one of .*'fancy'"):
        rtq.progress(fut)
    with pytest.raises(ValueError, match="pass queue="):
        rtq.progress("some-id", mode="off")


def test_a_terminal_screen_rewrites_the_line_on_carriage_return():
    screen = Screen()
    assert screen.feed("a  10%\r") == [] and screen.line == "a  10%"
    assert screen.feed("a  50%\rb") == [] and screen.line == "b  50%"  # overwritten, not erased
    assert screen.feed("\rdone!!\nnext\r\n") == ["done!!", "next"]
    assert screen.feed("tail") == [] and screen.flush() == ["tail"] and screen.flush() == []
    # A bar drawn on the line under the cursor (tqdm's position 1) is redrawn there, not repeated.
    lines = screen.feed("epoch 1\n") + screen.feed("".join(f"\n\rbar {k}%\x1b[A" for k in (0, 50, 99)))
    assert lines == ["epoch 1", ""] and screen.feed("\rbar 100%\x1b[K") == []
    assert screen.flush() == ["bar 100%", "bar 99%"]


# -- in a real Jupyter kernel -------------------------------------------------------------------
NOTEBOOK_SETUP = """
import sys, os, time, redis, rtq
from rtq.task_queue import RedisTaskQueue
queue = RedisTaskQueue(redis.Redis.from_url({url!r}), "test", timeout=30, interval=0.5)
ex = rtq.Executor(queue, "pq", timeout=30)
"""
CRUNCH = """
def crunch(flag, n):  # defined in the notebook: shipped by value
    import os, time, rtq
    while not os.path.exists(flag):
        print("tick", flush=True)
        time.sleep(0.2)
    for _ in rtq.tqdm(range(n), desc="crunching", mininterval=0):
        pass
    print("work done")
    return n

fut = ex.submit(crunch, {flag!r}, 50)
view = rtq.progress(fut)
assert view.mode == "widget" and not view.done  # returned at once: the task waits for the test
assert view.wait(30), "the view never finished"
assert fut.result(10) == 50
"""


class Recording:
    """Runs cells in a fresh kernel (nbclient, widget state stored), recording every widget state."""

    def __init__(self, redis_url: str, on_stream=None) -> None:
        nbformat = pytest.importorskip("nbformat")
        nbclient = pytest.importorskip("nbclient")
        self.history: dict[str, list[dict]] = {}  # model id -> each state it was sent, in order
        history = self.history

        class Client(nbclient.NotebookClient):
            def handle_comm_msg(self, outs, msg, cell_index):
                super().handle_comm_msg(outs, msg, cell_index)
                content = msg["content"]
                state = content.get("data", {}).get("state")
                if state is not None:
                    history.setdefault(content["comm_id"], []).append(dict(state))

            def output(self, outs, msg, display_id, cell_index):
                if on_stream is not None and msg["msg_type"] == "stream":
                    on_stream(cell_index, msg["content"]["text"])
                return super().output(outs, msg, display_id, cell_index)

        self.nbformat = nbformat
        self.client_class = Client
        self.setup = NOTEBOOK_SETUP.format(url=redis_url)

    def run(self, *cells: str):
        nb = self.nbformat.v4.new_notebook()
        nb.cells = [self.nbformat.v4.new_code_cell(c) for c in (self.setup, *cells)]
        self.client_class(
            nb, timeout=90, kernel_name="python3", store_widget_state=True, resources={"metadata": {"path": str(TESTS)}}
        ).execute(env=child_env())
        for cell in nb.cells:
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
        widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        return nb, {model_id: m["state"] for model_id, m in widgets.get("state", {}).items()}


def _models(models, name):
    return [m for m in models.values() if m.get("_model_name") == name]


def _html(models) -> list[str]:
    return [m.get("value", "") for m in _models(models, "HTMLModel")]


def _stream(cell, name=None) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and name in (None, o.name))


@pytest.fixture
def kernel_workers(workers):
    workers.start("pq", task_fn=None, args=("--workers", "4"))
    return workers


def test_widgets_in_a_kernel_update_live_and_print_into_the_cell(kernel_workers, redis_url, tmp_path):
    flag = tmp_path / "go"
    seen_in: list[int] = []

    def on_stream(cell_index: int, text_: str) -> None:
        if "tick" in text_:  # a print of the task, in the cell, while the task still waits: let it go on
            seen_in.append(cell_index)
            flag.touch()

    nb, models = Recording(redis_url, on_stream).run(CRUNCH.format(flag=str(flag)))
    assert seen_in and set(seen_in) == {1}, seen_in
    done = [b for b in _models(models, "FloatProgressModel") if b.get("max") == 50]
    assert done and done[0]["value"] == 50 and done[0]["bar_style"] == "success"
    assert any("crunching" in h for h in _html(models)) and any("50/50" in h for h in _html(models))
    out = _stream(nb.cells[1], "stdout")
    assert out.startswith("tick\n") and out.endswith("work done\n"), out


def test_what_tasks_print_is_ordinary_output_of_the_cell_that_called_progress(kernel_workers, redis_url, tmp_path):
    """Saved without widget state, a notebook still shows it; a later cell never gets it."""
    flag = str(tmp_path / "go")
    nb, models = Recording(redis_url).run(
        "def chat():\n    import time\n    print('first words', flush=True)\n    time.sleep(0.3)\n"
        "    print('last words')\n"
        "view = rtq.progress(ex.submit(chat))\nview.wait(30)",
        "def chat_later(flag):\n    import os, time\n    while not os.path.exists(flag):\n        time.sleep(0.05)\n"
        "    print('late words')\n"
        f"later = rtq.progress(ex.submit(chat_later, {flag!r}))",
        # The task prints while this cell runs: its words go to the cell that showed its bar.
        f"open({flag!r}, 'w').close()\nlater.wait(30)\nprint('the next cell')",
    )
    first, _, third = nb.cells[1:]
    assert _stream(first) == "first words\nlast words\n", first.outputs
    bars = first.outputs[0]  # ended, the widget gave way to a still picture the notebook keeps
    assert bars.output_type == "display_data" and "application/vnd.jupyter.widget-view+json" not in bars.data
    assert bars.data["text/plain"].startswith("chat(): ") and "chat()" in bars.data["text/html"], bars.data
    assert _stream(third) == "the next cell\n", third.outputs
    assert not _models(models, "OutputModel")  # the text lives in no widget


def test_a_librarys_tqdm_in_a_task_ends_as_one_line(kernel_workers, redis_url):
    """Its \\r redraws rewrite the line; nested in rtq.tqdm, beside other tasks' bars, it keeps its line."""
    nb, _ = Recording(redis_url).run(
        "def noisy(i):\n    from tqdm import tqdm\n    import rtq, time\n"
        "    for epoch in rtq.tqdm(range(2), desc='epochs'):\n"
        "        for _ in tqdm(range(20), desc=f'library bar {epoch}', mininterval=0):\n"
        "            time.sleep(0.01)\n"
        "    print('after the bars')\n"
        "view = rtq.progress([ex.submit(noisy, i) for i in range(3)])  # at once, in one worker\nview.wait(30)"
    )
    err = _stream(nb.cells[1], "stderr")
    assert "\r" not in err and "\x1b" not in err, repr(err)  # rendered as a terminal shows it
    for i in range(3):
        mine = [line for line in err.splitlines() if line.startswith(f"[noisy({i})]")]
        assert [line.split(":")[0] for line in mine] == [f"[noisy({i})] library bar {e}" for e in (0, 1)], repr(err)
        assert all("100%" in line and "20/20" in line for line in mine), repr(err)
    out = _stream(nb.cells[1], "stdout")
    assert sorted(out.splitlines()) == [f"[noisy({i})] after the bars" for i in range(3)], out


def test_one_label_per_task_for_its_bar_its_output_and_its_failure(kernel_workers, redis_url):
    nb, models = Recording(redis_url).run(
        "def chatty(i):\n    import rtq, time\n    for _ in rtq.tqdm(range(5), desc=f'chatty {i}'):\n"
        "        time.sleep(0.01)\n    print(f'from {i}')\n    if i == 2:\n        raise ValueError('bad two')\n"
        "view = rtq.progress([ex.submit(chatty, i) for i in range(3)])\nview.wait(30)",
        "def small(i):\n    if i in (7, 19):\n        raise ValueError(f'bad {i}')\n    return i\n"
        "many = rtq.progress([ex.submit(small, i) for i in range(30)])\nmany.wait(30)",
    )
    html_ = " ".join(_html(models))
    out = _stream(nb.cells[1], "stdout")
    for i in range(3):
        assert f">chatty({i})</span>" in html_, html_  # the bar's label
        assert f"[chatty({i})] from {i}\n" in out, out  # its output lines
    assert "chatty 0" in html_ and "chatty 1" in html_  # the tasks' own descriptions, shown apart
    assert "failed: ValueError: bad two" in html_  # a failed bar says why, in their place
    assert "small(7): ValueError: bad 7" in html_ and "small(19): ValueError: bad 19" in html_, html_
    assert "small #" not in html_ and "chatty #" not in html_


def test_an_aggregate_bar_shows_done_and_failed_apart(kernel_workers, redis_url):
    _, models = Recording(redis_url).run(
        "def small(i):\n    if i in (7, 19):\n        raise ValueError(f'bad {i}')\n    return i\n"
        "many = rtq.progress([ex.submit(small, i) for i in range(30)])\nmany.wait(30)"
    )
    assert any("30/30: 28 done, 2 failed [" in h for h in _html(models)), _html(models)
    bars = _models(models, "FloatProgressModel")
    done = [b for b in bars if b["bar_style"] == "success"]
    failed = [b for b in bars if b["bar_style"] == "danger"]
    assert len(done) == 1 and done[0]["value"] == done[0]["max"] == 28, bars  # the done part, green
    assert len(failed) == 1, bars  # the failed part, red, beside it: 2 of 30 of the width
    by_id = {f"IPY_MODEL_{k}": m for k, m in models.items()}
    assert by_id[done[0]["layout"]]["flex"] == "28 1 0%" and by_id[failed[0]["layout"]]["flex"] == "2 1 0%"
    assert by_id[failed[0]["layout"]]["display"] is None


def test_finished_bars_read_as_tqdms_and_keep_their_width_and_label(kernel_workers, redis_url):
    recording = Recording(redis_url)
    recording.run(
        "def count_up(n):\n    import rtq, time\n    for _ in rtq.tqdm(range(n), desc='counting', mininterval=0):\n"
        "        time.sleep(0.02)\n    return n\n"
        "view = rtq.progress(ex.submit(count_up, 40))\nview.wait(30)"
    )
    values = [[html.unescape(str(s["value"])) for s in states if "value" in s] for states in recording.history.values()]
    counts = next(v for v in values if any("40/40" in str(x) for x in v))
    assert re.search(r"40/40 \[00:0\d<00:00, +[\d.]+it/s\]", counts[-1]), counts[-1]
    widths = {re.search(r"min-width: (\d+)ch", str(x)).group(1) for x in counts}  # type: ignore[union-attr]
    assert len(widths) == 1, counts  # the counts' column never changed width: the bar did not shift
    labels = next(v for v in values if any("count_up(40)" in str(x) for x in v))
    assert all("count_up(40)" in str(x) for x in labels), labels  # never the function's name alone


def test_text_mode_in_a_kernel_shows_one_updated_display_above_the_output(kernel_workers, redis_url):
    nb, _ = Recording(redis_url).run(
        "os.environ['RTQ_PROGRESS'] = 'text'\n"
        "def count_up(n):\n    import rtq, time\n    print('counting')\n"
        "    for _ in rtq.tqdm(range(n), mininterval=0):\n        time.sleep(0.1 / n)\n    return n\n"
        "view = rtq.progress([ex.submit(count_up, n) for n in (10, 20)])"
    )
    outputs = nb.cells[1].outputs
    assert outputs[0].output_type == "display_data", outputs  # the bars, first: above the output
    lines = outputs[0].data["text/plain"].splitlines()
    assert [line.split(":")[0] for line in lines] == ["count_up(10)", "count_up(20)"], lines
    assert "10/10 [" in lines[0] and "20/20 [" in lines[1] and all("<00:00," in line for line in lines), lines
    assert _stream(nb.cells[1], "stdout") in (
        "[count_up(10)] counting\n[count_up(20)] counting\n",
        "[count_up(20)] counting\n[count_up(10)] counting\n",
    )
