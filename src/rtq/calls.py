"""Shipped calls: a function plus its arguments, run by a worker's generic task function.

A closure task is a seed task whose ``params`` is a :class:`Call`; ``run_call`` is the
``task_fn`` an ``rtq worker`` uses by default. cloudpickle ships the function by value when it
was defined in a notebook or ``__main__``, so the worker needs no copy of the caller's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .task import RedisTask

__all__ = ["Call", "run_call"]


@dataclass
class Call:
    """A function call to make on a worker."""

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def run_call(task: RedisTask) -> Any:
    """The worker-side task function for shipped calls."""
    call = task.params
    if not isinstance(call, Call):
        raise TypeError(
            f"task {task.id} in {task.name} carries {type(call).__name__} params, not a shipped "
            "call; start the worker with --task-fn module:function to run plain seed tasks"
        )
    return call()
