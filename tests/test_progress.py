"""Progress and output (issue 6): rtq.tqdm, task.update throttling, streamed output, rtq.progress."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
import tqdm.std

import progressfns
import rtq
from conftest import TESTS, wait_for
from rtq import display
from rtq.task import PROGRESS_INTERVAL, RedisTask
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
    task._report = lambda t: written.append((t.current_progress, t.total_progress)) or "running"
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
    assert "adding: 100%" in captured.err and "25/25" in captured.err
    assert captured.out == "counting to 25\ncounted\n"
    assert fut.result(10) == sum(range(25))


def test_many_tasks_show_one_aggregate_bar_and_the_failures(ex, capsys):
    futs = [ex.submit(progressfns.maybe_fail, i) for i in range(25)]
    view = rtq.progress(futs, mode="text")
    assert view.done and len(view.rows) == 1
    err = capsys.readouterr().err
    assert "25/25" in err and "25 tasks" in err
    expected = [f"maybe_fail #{i + 1}: ValueError: bad {i}" for i in (3, 13, 23)]
    assert sorted(view.failures) == sorted(expected)  # repeated labels are numbered
    assert all(line in err for line in expected)
    assert "maybe_fail #1:" not in err  # no bar per task (task 0 succeeded)


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


# -- in a real Jupyter kernel -------------------------------------------------------------------
NOTEBOOK_SETUP = """
import sys, os, time, redis, rtq
from rtq.task_queue import RedisTaskQueue
queue = RedisTaskQueue(redis.Redis.from_url({url!r}), "test", timeout=30, interval=0.5)
ex = rtq.Executor(queue, "pq", timeout=30)

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
"""
NOTEBOOK_WAIT = """
assert view.wait(30), "the view never finished"
assert fut.result(10) == 50
def bad(i):
    if i % 10 == 3:
        raise ValueError(f"bad {{i}}")
    return i
many = rtq.progress([ex.submit(bad, i) for i in range(25)])
assert many.wait(30) and len(many.failures) == 3
"""


def test_widgets_in_a_kernel_update_live_and_show_streamed_output(workers, redis_url, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workers.start("pq", task_fn=None, args=("--workers", "4"))
    flag = tmp_path / "go"
    ticks_seen_in: list[int] = []

    class Client(nbclient.NotebookClient):
        def handle_comm_msg(self, outs, msg, cell_index):
            super().handle_comm_msg(outs, msg, cell_index)
            for out in msg["content"].get("data", {}).get("state", {}).get("outputs", None) or []:
                # Seen in the cell's output widget while the task still waits: let it finish.
                if "tick" in out.get("text", "") and cell_index == 1:
                    ticks_seen_in.append(cell_index)
                    flag.touch()

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(NOTEBOOK_SETUP.format(url=redis_url, flag=str(flag))),
        nbformat.v4.new_code_cell(NOTEBOOK_WAIT.format()),
    ]
    Client(
        nb, timeout=90, kernel_name="python3", store_widget_state=True, resources={"metadata": {"path": str(TESTS)}}
    ).execute()
    assert ticks_seen_in, "the task's prints never reached the cell's output widget"
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    models = [m["state"] for m in state.values()]
    bars = [m for m in models if m.get("_model_name") == "FloatProgressModel"]
    done = [b for b in bars if b.get("max") == 50]
    assert done and done[0]["value"] == 50 and done[0]["bar_style"] == "success"
    aggregate = [b for b in bars if b.get("max") == 25]
    assert aggregate and aggregate[0]["value"] == 25 and aggregate[0]["bar_style"] == "danger"
    html = " ".join(m.get("value", "") for m in models if m.get("_model_name") == "HTMLModel")
    assert "crunching" in html and "3 failed" in html and "ValueError: bad 13" in html
    texts = [o.get("text", "") for m in models if m.get("_model_name") == "OutputModel" for o in m.get("outputs", [])]
    assert any("tick" in t and t.rstrip().endswith("work done") for t in texts), json.dumps(texts)[:500]
