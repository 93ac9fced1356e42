"""rtq: run notebook work on remote (GPU) workers through Redis, and watch it live.

Only the names in ``__all__`` are public. They load lazily, so ``import rtq`` stays light:
IPython, ipywidgets and tqdm's notebook parts load only when a feature needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RedisTaskQueue": "rtq.task_queue",
    "RedisTask": "rtq.task",
    "TaskExecutePolicy": "rtq.task",
    "current_task": "rtq.task",
    "connect": "rtq.connection",
    "Executor": "rtq.executor",
    "TaskFuture": "rtq.executor",
    "Actor": "rtq.sessions",
    "errors": "rtq.errors",
    "tqdm": "rtq.report",
    "progress": "rtq.display",
    "local_worker": "rtq.local",
    "dashboard": "rtq.web",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what the lazy exports are, for type checkers and IDEs
    from . import errors as errors
    from .connection import connect as connect
    from .display import progress as progress
    from .executor import Executor as Executor
    from .executor import TaskFuture as TaskFuture
    from .local import local_worker as local_worker
    from .report import tqdm as tqdm
    from .sessions import Actor as Actor
    from .task import RedisTask as RedisTask
    from .task import TaskExecutePolicy as TaskExecutePolicy
    from .task import current_task as current_task
    from .task_queue import RedisTaskQueue as RedisTaskQueue
    from .web import dashboard as dashboard


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtq' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "errors":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rtq``: register the ``%rtq`` and ``%%rtq`` magics (imports IPython only now)."""
    from .notebook.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext rtq``: stop what ``%rtq connect`` started."""
    from .notebook.magic import unload_ipython_extension as unload

    unload(ipython)
