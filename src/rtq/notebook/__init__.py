"""rtq in Jupyter: the ``%rtq`` / ``%%rtq`` magics.

Nothing here is imported by ``import rtq``: ``%load_ext rtq`` imports :mod:`rtq.notebook.magic`
(and with it IPython) only when the extension is loaded. :mod:`rtq.notebook.cells` holds the
half of ``%%rtq`` that runs on workers, and imports no IPython at all.
"""

from __future__ import annotations

__all__ = ["load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: object) -> None:
    """Register the magics with ``ipython`` (what ``%load_ext rtq`` calls)."""
    from .magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """Stop what ``%rtq connect`` started (``%unload_ext rtq``)."""
    from .magic import unload_ipython_extension as unload

    unload(ipython)
