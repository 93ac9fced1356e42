"""A record's payloads as they are stored: hash fields, big frames' own keys, buffers by digest.

:meth:`rtq.backend.store.TaskStore.encode` makes an :class:`Encoded`; the store (submit, write)
and a worker's claims (finish) turn it into commands. Everything it stores besides the hash
expires after the record can.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..digests import Ref
from ..serialization import CHUNK

__all__ = ["FRAME_SLACK_S", "KEEP_S", "LIST_FIELDS", "LIST_NAMES", "Encoded", "flatten", "frames_until"]

KEEP_S = 300.0
"""Seconds a finished task's outcome stays readable at least, even past its deadline."""
FRAME_SLACK_S = 60.0
"""Seconds a big frame outlives the longest its record can live (the deadline plus ``KEEP_S``)."""
LIST_NAMES = ("params", "result", "error")
"""The payload fields of a record, whose ``<name>#`` fields list their extra frames."""
LIST_FIELDS = [f"{name}#" for name in LIST_NAMES]


@dataclass
class Encoded:
    """Payloads as stored: fields of the task's hash, big frames under keys of their own, and buffers by digest.

    ``blobs`` are ``(ref, buffer, part keys)`` of the buffers the payloads name by digest,
    ``send`` the names of those Redis did not hold when asked (their bytes go with the record).
    """

    fields: dict[str, Any]
    frames: dict[str, Any] = field(default_factory=dict)
    blobs: list[tuple[Ref, memoryview, list[str]]] = field(default_factory=list)
    send: set[str] = field(default_factory=set)

    @property
    def named(self) -> list[str]:
        """The keys of every buffer the payloads name by digest."""
        return [key for _, _, keys in self.blobs for key in keys]

    def add(self, other: Encoded) -> None:
        self.fields.update(other.fields)
        self.frames.update(other.frames)
        self.blobs += other.blobs
        self.send |= other.send

    def frame_commands(self, expiry: float) -> list[tuple[Any, ...]]:
        """The ``SET`` commands of the big frames (sent as they are, uncopied).

        They expire after the record can: a record lives until its deadline, or ``KEEP_S``
        past the moment it ends when that is later.
        """
        at_ms = int(frames_until(expiry) * 1000)
        return [("SET", key, frame, "PXAT", at_ms) for key, frame in self.frames.items()]

    def blob_commands(self, expiry: float) -> list[tuple[Any, ...]]:
        """The ``SET`` commands of the buffers to send by digest (sent as they are, uncopied).

        Sent ahead of the record's transaction, not in it: a server refuses a transaction
        carrying a gigabyte, and a buffer is useful alone (a writer that dies after sending it
        leaves a key that expires). Each expires as a big frame does, and is set only if not
        there (``NX``): another writer may have stored it meanwhile, for a payload that needs it
        longer.
        """
        at_ms = int(frames_until(expiry) * 1000)
        commands: list[tuple[Any, ...]] = []
        for ref, buffer, keys in self.blobs:
            if ref.name in self.send:
                view = memoryview(buffer)
                for i, key in enumerate(keys):
                    commands.append(("SET", key, view[i * CHUNK : (i + 1) * CHUNK], "NX", "PXAT", at_ms))
        return commands


def frames_until(expiry: float) -> float:
    """When the frames of a record due at ``expiry`` may go (Unix seconds): after the record can."""
    return max(expiry, time.time()) + KEEP_S + FRAME_SLACK_S


def flatten(fields: dict[str, Any]) -> list[Any]:
    """``{field: value}`` as ``[field, value, field, value, …]`` (HSET's and a script's arguments)."""
    return [item for pair in fields.items() for item in pair]
