"""The notebooks in notebooks/ run top to bottom in a real kernel, as a newcomer runs them.

Each runs in a fresh ``python3`` kernel (nbclient) with ``RTQ_REDIS_URL`` unset: the laptop path,
where the notebook itself starts an embedded server and a local worker (``rtq.local_worker``,
``%rtq connect``). tests/test_binder.py runs the quickstart the Binder way, against a server and
worker started by ``binder/start``. A cell that raises fails the test (unless it is tagged
``raises-exception``), and each test checks what the cells printed, then that everything the
kernel started has exited.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import uuid
from typing import Any

import nbformat
import pytest

from conftest import ROOT, child_env, wait_for
from nbrun import execute, processes_with_env

NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01-quickstart.ipynb", "02-cell-magic.ipynb", "03-gpu-offload.ipynb", "04-sessions.ipynb"]
CELL_TIMEOUT = 60

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _leftovers(token: str) -> list[int]:
    return processes_with_env("RTQ_NB_TEST", token)


def _run(name: str) -> Any:
    """Execute notebook ``name`` in a fresh kernel; fail if anything it started outlives the kernel."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in child_env().items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET", "RTQ_PROGRESS")}
    env["RTQ_NB_TEST"] = token  # inherited by the kernel's children: finds leaks
    try:
        nb = execute(NOTEBOOKS / name, env=env, timeout=CELL_TIMEOUT)
        wait_for(lambda: not _leftovers(token), 30, "the notebook's server and worker to exit with the kernel")
    finally:
        for pid in _leftovers(token):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    return nb


def _text(cell: Any) -> str:
    """Everything a cell showed, as text (streams, text/plain results, tracebacks)."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(_ANSI.sub("", "\n".join(out.traceback)))
    return "".join(parts)


def _widget_text(nb: Any) -> str:
    """The text of every HTML widget the notebook's saved widget state holds."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return " ".join(
        html.unescape(m["state"].get("value", "")) for m in state.values() if m["model_name"] == "HTMLModel"
    )


def _cell(nb: Any, starts: str) -> Any:
    """The one code cell whose source starts with ``starts``."""
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)]
    assert len(found) == 1, f"{len(found)} cells start with {starts!r}"
    return found[0]


def _stderr(nb: Any) -> list[str]:
    return [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"]


def test_the_notebooks_are_there_and_committed_without_outputs() -> None:
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == EXPECTED, found
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        assert "widgets" not in nb.metadata, f"{name}: widget state is committed"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name}: a cell has outputs (strip them): {cell.source[:60]!r}"
                assert cell.execution_count is None, f"{name}: a cell has an execution count: {cell.source[:60]!r}"
            assert not cell.get("attachments"), f"{name}: a cell has attachments"


@pytest.mark.timeout(90)
def test_quickstart_runs_top_to_bottom() -> None:
    nb = _run("01-quickstart.ipynb")
    assert "started a local worker (pid" in _text(_cell(nb, 'if q.is_listened("default")'))
    out = _text(_cell(nb, "import os\n\nex = rtq.Executor"))
    m = re.search(r"work\(14\) = 42, computed in process (\d+); this kernel is process (\d+)", out)
    assert m and m.group(1) != m.group(2), out  # it ran in another process
    out = _text(_cell(nb, "squares = "))
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out and "norm of Point(3, 4): 5.0" in out, out
    assert "2**30 = 1073741824" in _text(_cell(nb, "from concurrent.futures import as_completed"))
    assert "the worker raised ZeroDivisionError: division by zero" in _text(_cell(nb, "def risky"))
    bar = _cell(nb, "import time\n\n\ndef train")
    assert any(
        o.output_type == "display_data" and "application/vnd.jupyter.widget-view+json" in o.data for o in bar.outputs
    )
    assert "final loss: 0.0148 - progress: (40.0, 40.0)" in _text(_cell(nb, 'print("final loss:"'))
    assert "results: [20, 40, 60]" in _text(_cell(nb, "view.wait(60)"))
    assert not _stderr(nb), _stderr(nb)


@pytest.mark.timeout(90)
def test_cell_magic_notebook_runs_top_to_bottom() -> None:
    nb = _run("02-cell-magic.ipynb")
    assert "started an embedded server" in _text(_cell(nb, "%rtq connect"))
    assert "queues=default" in _text(_cell(nb, "%rtq status"))
    m = re.search(
        r"computed on .*, pid (\d+); this kernel is pid (\d+)", _text(_cell(nb, 'import os\n\nprint(f"{len(kept)}'))
    )
    assert m and m.group(1) != m.group(2)
    assert _text(_cell(nb, "%%rtq default")) == "{'n': 799, 'mean': 300.0}"
    assert "mean: 249.75 | scratch came back: False" in _text(_cell(nb, 'print("mean:"'))
    live = _cell(nb, "%%rtq --progress-after")
    assert "step 0" in _text(live) and "step 20" in _text(live)
    assert live.outputs[0].output_type == "display_data", live.outputs  # the bar, above the prints
    assert "30/30 [" in live.outputs[0].data["text/plain"], live.outputs  # its final picture stays
    assert "30/30 [" in _widget_text(nb) and "%%rtq cell In[" in _widget_text(nb)  # the live widgets'
    waited = _cell(nb, "%%rtq --no-wait -o job")
    assert "%rtq wait job" in _text(waited) and not [o for o in waited.outputs if o.output_type == "execute_result"]
    assert "answer arrived yet: False" in _text(_cell(nb, 'print("meanwhile'))
    assert _text(_cell(nb, "%rtq wait job")) == "42" and _text(_cell(nb, "answer")) == "42"
    assert "stopped: task" in _text(_cell(nb, "import rtq\n\ntry:"))
    # The last cell fails on purpose: its traceback shows the cell's own failing line.
    last = nb.cells[-1]
    assert "raises-exception" in last.metadata.get("tags", [])
    errors = [o for o in last.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ZeroDivisionError", last.outputs
    shown = _text(last)
    assert re.search(r"----> 5\s+inverses\.append\(1 / v\)", shown), shown
    assert "raised in the %%rtq cell on worker" in shown
    assert not _stderr(nb), _stderr(nb)


@pytest.mark.timeout(90)
def test_gpu_offload_notebook_trains_or_skips_cleanly() -> None:
    nb = _run("03-gpu-offload.ipynb")
    first = _text(nb.cells[1])
    summary = _text(nb.cells[-1])
    if importlib.util.find_spec("torch") is None:
        assert "torch is not installed: this notebook skips its training cells" in first, first
        assert "torch is not installed there" in _text(_cell(nb, "%%rtq gpu\nimport importlib.util"))
        assert summary.strip() == "skipped: torch is not installed", summary
    else:
        assert "the training cells will run" in first, first
        assert re.search(r"trained on (cpu|cuda) for 300 epochs: loss [0-9.]+ -> 0\.0[0-9]+", summary), summary
        assert "model(+0.5)" in summary
        training = _cell(nb, "%%rtq gpu --pull")
        assert "epoch 200" in _text(training), _text(training)
    assert not _stderr(nb), _stderr(nb)  # skipping or not, nothing went wrong


@pytest.mark.timeout(120)
def test_sessions_notebook_keeps_state_on_the_worker() -> None:
    nb = _run("04-sessions.ipynb")
    loaded = _text(_cell(nb, "%%rtq --session model\nimport numpy"))
    m = re.search(r"loaded \(2000, 500\) in process (\d+)", loaded)
    assert m, loaded
    assert _text(_cell(nb, "'weights' in dir()")) == "False"
    mean = _text(_cell(nb, "%%rtq --session model\nscores"))
    assert re.fullmatch(r"-?\d+\.\d+", mean), mean
    listing = _text(_cell(nb, "# where each session lives"))
    assert "session 'model' (queue 'default'): worker " in listing, listing
    assert "weights  numpy.ndarray  7.6 MiB" in listing, listing
    assert "batch" in listing and "scores" in listing, listing
    assert _text(_cell(nb, "summary")).startswith("{'rows': 2000, 'mean': "), _text(_cell(nb, "summary"))
    assert "results: [11, 12, 13, 14, 15]" in _text(_cell(nb, "import rtq\n\nex = rtq.Executor"))
    closed = _text(_cell(nb, "counter.close()"))
    assert "SessionLost: actor 'Counter' is lost (closed: actor.close() by its owner)" in closed, closed
    assert "closed session 'model'" in _text(_cell(nb, "%rtq session close model"))
    assert not _stderr(nb), _stderr(nb)
