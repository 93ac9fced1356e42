"""The Python examples in README.md and docs/*.md run as written.

Each page's ```python blocks run in order, as one script (a reader follows a page top to bottom),
in a fresh interpreter with ``RTQ_REDIS_URL`` pointing at the test server and a worker serving the
queues ``default`` and ``gpu``. A block preceded by ``<!-- not run: REASON -->`` is skipped; the
reason is required. IPython (``%%rtq``) examples are covered by notebooks/02-cell-magic.ipynb.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, Workers, child_env

FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!-- not run: (.+?) -->")


def pages() -> list[Path]:
    """README and the docs pages (not api.md: its code blocks are generated signatures)."""
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")]


def code_blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason) of every fenced block of ``page``, in order."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        marker = SKIP.search(before[-1]) if before else None
        blocks.append((m.group(2), textwrap.dedent(m.group(3)), marker.group(1) if marker else None))
    return blocks


def runnable(page: Path) -> str:
    return "\n\n".join(code for lang, code, skip in code_blocks(page) if lang == "python" and skip is None)


RUNNABLE = [p for p in pages() if runnable(p)]


def test_every_example_is_run_or_says_why_not() -> None:
    for page in pages():
        text = page.read_text()
        markers = text.count("<!-- not run")
        assert markers == len(SKIP.findall(text)), f"{page.name}: a 'not run' marker without a reason"
        for lang, _code, skip in code_blocks(page):
            if skip is not None:
                assert lang == "python", f"{page.name}: a 'not run' marker on a {lang or 'plain'} block"
    assert {p.name for p in RUNNABLE} >= {"README.md", "getting-started.md", "executor.md", "progress.md"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_python_examples_run(page: Path, workers: Workers, redis_url: str, tmp_path: Path) -> None:
    workers.start("default", "gpu", task_fn=None, prefix="rtq")
    env = {k: v for k, v in child_env().items() if k not in ("RTQ_SECRET",)}
    env.update(RTQ_REDIS_URL=redis_url, RTQ_PROGRESS="text")
    script = tmp_path / f"{page.stem}_examples.py"
    script.write_text(runnable(page))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0, f"{page.name} examples failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
