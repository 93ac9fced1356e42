"""Shipped calls: a function plus its arguments, run by a worker's generic task function.

A closure task is a seed task whose ``params`` is a :class:`Call`; ``run_call`` is the
``task_fn`` an ``rtq worker`` uses by default. cloudpickle ships the function by value when it
was defined in a notebook or ``__main__``, so the worker needs no copy of the caller's code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .frames import annotate
from .task import RedisTask

__all__ = ["LABEL_WIDTH", "Call", "call_label", "run_call"]

LABEL_WIDTH = 40
"""Longest label (characters) made for a call."""


@dataclass
class Call:
    """A function call to make on a worker.

    Attributes:
        fn: The function.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        label: What displays call it — its bar, its output lines, its line in a failure list and
            in ``rtq status`` (stored in the task's record): by default the function with its
            short arguments, ``train(3, lr=0.1)``, so that a task is known by what it computes.
    """

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = call_label(self.fn, self.args, self.kwargs)

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def call_label(fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> str:
    """``small(7)``, ``train(<DataFrame>, lr=0.1)``: a function and the arguments that read short.

    Arguments are never ``repr``-ed whole (a DataFrame's repr is big and slow): numbers, short
    strings, booleans and None show their value, anything else its type.
    """
    kwargs = kwargs or {}
    while isinstance(fn, functools.partial):
        fn, args, kwargs = fn.func, (*fn.args, *args), {**fn.keywords, **kwargs}
    qualname = getattr(fn, "__qualname__", None)
    name = qualname if isinstance(qualname, str) and "<" not in qualname else getattr(fn, "__name__", None)
    parts = [_short(a) for a in args[:4]] + [f"{k}={_short(v)}" for k, v in list(kwargs.items())[:4]]
    if len(args) > 4 or len(kwargs) > 4:
        parts.append("…")
    label = f"{name if isinstance(name, str) else type(fn).__name__}({', '.join(parts)})"
    return label if len(label) <= LABEL_WIDTH else label[: LABEL_WIDTH - 2] + "…)"


def _short(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        shown = repr(value)
        return shown if len(shown) <= 12 else shown[:11] + "…"
    if isinstance(value, str):
        return repr(value) if len(value) <= 12 else repr(value[:10])[:-1] + "…" + repr(value)[-1]
    return f"<{type(value).__name__}>"


def run_call(task: RedisTask) -> Any:
    """The worker-side task function for shipped calls.

    Raises:
        Exception: whatever the call raised, carrying where it was raised (see
            :func:`rtq.frames.annotate`), so a notebook shows the call's own frames.
    """
    call = task.params
    if not isinstance(call, Call):
        raise TypeError(
            f"task {task.id} in {task.name} carries {type(call).__name__} params, not a shipped "
            "call; start the worker with --task-fn module:function to run plain seed tasks"
        )
    try:
        return call()
    except BaseException as exc:
        annotate(exc)
        raise
