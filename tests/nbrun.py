"""Execute a notebook top to bottom in a real IPython kernel (nbclient), as a newcomer's "Run All" would.

Used by tests/test_notebooks.py, and as a command by tests/test_binder.py (run under
``binder/start``)::

    python tests/nbrun.py notebooks/01-quickstart.ipynb --out executed.ipynb [--timeout 60]

A cell that raises fails the run (nbclient's ``CellExecutionError``, naming the cell), unless
the cell is tagged ``raises-exception``. The kernel runs in the notebook's folder and is shut
down gracefully at the end, so what the notebook started (an embedded server, a local worker)
stops with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient


def execute(path: str | Path, *, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run every cell of ``path`` in a fresh ``python3`` kernel; returns the executed notebook.

    Args:
        path: The ``.ipynb`` file (it is not modified).
        env: The kernel's whole environment (default: this process's).
        timeout: Seconds each cell may take.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    if env is None:
        client.execute()
    else:
        client.execute(env=env)
    return nb


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds ``name=value`` (Linux ``/proc``; else none).

    Tests put a unique value in a kernel's or script's environment; every process started from
    it inherits the value, so this finds what they left running.
    """
    needle = f"{name}={value}".encode()
    found = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie has exited already
                    found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--out", help="write the executed notebook here")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per cell (default 60)")
    args = parser.parse_args(argv)
    nb = execute(args.notebook, timeout=args.timeout)
    if args.out:
        nbformat.write(nb, args.out)
    print(f"nbrun: {args.notebook}: {sum(c.cell_type == 'code' for c in nb.cells)} code cells ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
