"""binder/start, run locally: it starts a server and a worker, and the quickstart runs against them.

The start script is run the way Binder runs it — ``binder/start COMMAND...`` — with the command
being tests/nbrun.py executing notebooks/01-quickstart.ipynb in a real kernel. The notebook must
find the Binder worker (``RTQ_REDIS_URL`` is set by the script) rather than start its own, and
the server and worker must exit on their own once the command ends (they are tied to it).
Whatever is left is killed: the script runs in its own process group, and every process it
started carries a marker in its environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid

import nbformat
import pytest

from conftest import ROOT, TESTS, child_env, wait_for
from nbrun import processes_with_env

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(sys.platform == "win32", reason="binder/start is a bash script for Linux containers"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_binder_start_serves_the_quickstart_and_leaves_nothing_running(tmp_path):
    token = uuid.uuid4().hex
    port = _free_port()
    out = tmp_path / "executed.ipynb"
    env = {k: v for k, v in child_env().items() if k not in ("RTQ_REDIS_URL", "RTQ_SECRET", "RTQ_PROGRESS")}
    env.update(
        RTQ_PORT=str(port),
        RTQ_LOG_DIR=str(tmp_path),
        RTQ_NB_TEST=token,  # inherited by everything the script starts
        PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),  # its `python` and `rtq`
    )
    cmd = [str(ROOT / "binder" / "start"), sys.executable, str(TESTS / "nbrun.py")]
    cmd += [str(ROOT / "notebooks" / "01-quickstart.ipynb"), "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        try:
            output, _ = proc.communicate(timeout=75)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise AssertionError(f"binder/start did not finish in 75 s:\n{output}") from None
        assert proc.returncode == 0, output
        assert "11 code cells ran" in output, output

        # The server's log shows its URL without the password, which only reached a file in a
        # folder of this user's own (gone once the server stopped) and, from there, the environment.
        server_log = (tmp_path / "rtq-server.log").read_text()
        assert f"rtq server: redis://:***@127.0.0.1:{port}/0" in server_log, server_log
        (private,) = tmp_path.glob("rtq-private.*")
        assert private.is_dir() and private.stat().st_mode & 0o077 == 0
        # The notebook used the Binder worker: its tasks ran in that worker's process.
        nb = nbformat.read(out, as_version=4)
        shown = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"]
        assert "a worker already serves 'default': using it" in shown[1], shown[1]
        ran_in = re.search(r"computed in process (\d+)", shown[2])
        assert ran_in, shown[2]
        worker_log = (tmp_path / "rtq-worker.log").read_text()
        assert re.search(rf"rtq worker \S+:{ran_in.group(1)}:\S+ serving default, gpu", worker_log), worker_log

        # The command ended: the server and the worker end with it (no orphans).
        wait_for(lambda: not processes_with_env("RTQ_NB_TEST", token), 45, "binder's server and worker to exit")
        assert "SIGTERM: finishing running tasks" in (tmp_path / "rtq-worker.log").read_text()
        assert list(private.iterdir()) == []  # the stopped server took its URL file with it
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in processes_with_env("RTQ_NB_TEST", token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
