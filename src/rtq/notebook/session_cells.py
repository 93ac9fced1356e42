"""What a session runs for the notebook (on the worker): its cells, and names moved in and out.

The functions here are the calls ``%%rtq --session``, ``%rtq pull`` and ``%rtq push`` queue to
a session (:mod:`rtq.worker.sessions`); each finds the session's namespace through
:func:`~rtq.worker.sessions.current_session`. This module imports no IPython: workers need only rtq.
"""

from __future__ import annotations

import socket
import types
from typing import Any

from ..worker.sessions import current_session, held_names
from .cells import CellResult, CellSpec, run_cell, ship_back

__all__ = ["missing_names", "pull_names", "push_names", "run_session_cell"]


def run_session_cell(spec: CellSpec) -> CellResult:
    """Run a ``%%rtq --session`` cell in its session's namespace; what it assigns stays there."""
    session = current_session()
    result = run_cell(spec, session.namespace)
    result.held = held_names(session)
    return result


def pull_names(names: tuple[str, ...], cpu: bool) -> CellResult:
    """``%rtq pull``: the values of ``names`` from the session, to assign in the notebook.

    Raises:
        NameError: The session holds no such name (the error lists what it holds).
    """
    session = current_session()
    namespace = session.namespace
    missing = [n for n in names if n not in namespace]
    if missing:
        raise NameError(missing_names(session.label, missing, held_names(session)))
    result = CellResult(host=socket.gethostname(), held=held_names(session))
    pulled = []
    for name in names:
        if isinstance(namespace[name], types.ModuleType):
            result.modules[name] = namespace[name].__name__
        else:
            pulled.append((name, namespace[name]))
    result.values, result.skipped = ship_back(pulled, cpu=cpu)
    return result


def push_names(values: dict[str, Any]) -> list[list[Any]]:
    """``%rtq push``: put notebook values into the session (replacing what it held); what it holds now."""
    session = current_session()
    session.namespace.update(values)
    return held_names(session)


def missing_names(label: str, missing: list[str], held: list[list[Any]]) -> str:
    """The error for names a session does not hold, listing what it does."""
    have = ", ".join(str(n[0]) for n in held) or "nothing yet"
    return f"session {label!r} holds no {', '.join(repr(n) for n in missing)}; it holds: {have}"
