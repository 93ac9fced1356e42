"""The API reference in docs/ is generated from the docstrings and must not drift from them."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_api_reference_matches_docstrings():
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
