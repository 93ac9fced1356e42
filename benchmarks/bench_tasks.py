"""The work every system runs in the benchmarks: plain functions, importable by peer workers.

rtq ships these by value (this folder is not installed, so cloudpickle sends the code, as it
would for a function defined in a notebook); RQ imports them by name on its workers.
"""

from __future__ import annotations

from typing import Any


def noop(*args: Any) -> None:
    """Does nothing: what is measured is the queue's own cost."""
    return None


def echo(value: Any) -> Any:
    """Sends its argument back: a payload makes the trip there and back."""
    return value
