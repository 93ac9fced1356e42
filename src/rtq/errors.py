"""The exceptions rtq raises.

Every error rtq raises itself derives from :class:`RtqError`, so ``except rtq.errors.RtqError``
catches all of them. An exception raised *by a task* is re-raised in the caller as its own type
when it can be shipped back; only when it cannot does the caller get :class:`RemoteTaskError`.
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "ConfigurationError",
    "DashboardError",
    "NotReplicated",
    "RedisFull",
    "RemoteTaskError",
    "ResultFreed",
    "RtqConnectionError",
    "RtqError",
    "SerializationError",
    "SessionLost",
    "SessionRefused",
    "SignatureError",
    "TaskCancelled",
    "TaskLost",
    "TaskTimeout",
    "VersionMismatch",
    "WorkerLost",
]


class RtqError(Exception):
    """Root of every error rtq raises itself."""


class RtqConnectionError(RtqError, ConnectionError):
    """Raised when Redis cannot be reached or the embedded server cannot start."""


class ConfigurationError(RtqError, ValueError):
    """Raised when an option, name or URL given to rtq is invalid."""


class SerializationError(RtqError, TypeError):
    """Raised when a value cannot be shipped: it names the object and where it sits."""


class SignatureError(RtqError):
    """Raised when a payload is unsigned, signed with another secret, or tampered with."""


# Since Python 3.11 ``concurrent.futures.TimeoutError`` is the builtin; on 3.10 it is not.
_TIMEOUT_BASES: tuple[type[BaseException], ...] = (
    (TimeoutError,)
    if concurrent.futures.TimeoutError is TimeoutError
    else (concurrent.futures.TimeoutError, TimeoutError)
)


class TaskTimeout(RtqError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """Raised when a task's deadline passes before it finishes (also a builtin ``TimeoutError``)."""


class TaskCancelled(RtqError, concurrent.futures.CancelledError):
    """Raised inside a task whose caller cancelled it, and to a caller waiting on it."""


class WorkerLost(RtqError):
    """Raised when the workers running a task died more times than ``max_attempts`` allows."""


class SessionLost(RtqError):
    """Raised by a call or cell aimed at a session or actor that no longer exists.

    Its worker died or stopped, it was closed, or it expired idle; the message names the
    worker, its host and why. A lost session is never re-created empty: its state is gone.
    """


class SessionRefused(RtqError):
    """Raised when a worker cannot open another session or actor (it holds its ``--sessions`` limit)."""


class ResultFreed(RtqError, LookupError):
    """Raised by ``result()`` of an actor call whose large value its worker no longer holds.

    Large actor results stay on the worker until asked for; one asked for twice from another
    future, or long after the call's deadline, was freed.
    """


class RedisFull(RtqError):
    """Raised when Redis refused to store a task or its outcome for lack of memory (``maxmemory``)."""


class NotReplicated(RtqConnectionError):
    """Raised when ``durable=True`` and no replica acknowledged a submit in time (a failover could lose it)."""


class TaskLost(RtqError):
    """Raised when a task's data vanished from Redis (restart, eviction, flush) while waited on."""


class DashboardError(RtqError):
    """Raised when ``rtq dashboard`` cannot start: Tornado is missing, or its address cannot be bound."""


class VersionMismatch(RtqError):
    """Raised before shipping a closure to workers whose Python or cloudpickle differs."""


class RemoteTaskError(RtqError):
    """Raised when a task failed with an exception that could not be shipped back as itself.

    Attributes:
        type_name: The qualified name of the original exception type.
        message: ``str()`` of the original exception.
        remote_traceback: The traceback text as formatted on the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.type_name, self.message, self.remote_traceback))

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text
