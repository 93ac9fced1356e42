"""Buffers stored once by digest: data that Redis already holds is not sent again.

A payload names each of its big out-of-band buffers by a digest of its bytes
(:mod:`rtq.digests`); the bytes live under ``<p>|<s>|blob:<digest>:<i>`` (one key per
``CHUNK`` of the buffer, each a plain string), shared by every payload of the namespace that
names them. Before sending, a writer asks in one round trip which of its buffers Redis holds
(``touch.lua``, which also pushes back their expiry) and sends only the others, with ``SET NX``:
two writers racing to store the same buffer store it once, and a buffer's expiry is never
shortened by a payload that needs it less long.

A buffer lives until no payload has used it for a while: every use keeps it at least as long as
the payload naming it can be read (its task's deadline plus the time an outcome stays readable,
like a big frame), and then it expires. Nothing deletes one when a task ends (other tasks may
name it), except a reader that finds its bytes do not match the digest: it deletes them, so the
next payload naming it sends them again.

A task whose buffer vanished between that question and the transaction that stores it (evicted,
deleted) is never queued naming bytes nobody has: ``enqueue.lua`` queues it in that transaction
only if every buffer is there, and the writer sends the missing ones and queues it then.

Reading (:meth:`Blobs.fetch`): from the worker's :class:`~rtq.buffercache.BufferCache` when it
holds the buffer (no Redis read at all), else straight from Redis into the buffer's memory (sizes
checked against ``STRLEN`` before anything is allocated), then checked against the digest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis as redis_py

from ..buffercache import BufferCache, Slot
from ..digests import Ref, check
from ..errors import SerializationError
from ..outofband import read_target
from ..serialization import CHUNK, size_text
from .encoded import Encoded, frames_until
from .keys import Keys
from .replies import raise_errors
from .wire import ChannelPool, call_script

if TYPE_CHECKING:
    from ..task import RedisTask

__all__ = ["Blobs", "parts"]


def parts(size: int) -> int:
    """How many keys a buffer of ``size`` bytes is stored in."""
    return max(1, -(-size // CHUNK))


class Blobs:
    """The buffers one namespace stores by digest.

    Args:
        client: A bytes-returning client.
        keys: The namespace's key names.
        channels: Held connections for the reads and the question before sending.
        scripts: The registered scripts (``touch``).
        signed: Whether payloads are signed (a buffer that fails its check is then forged).
        cache: The worker's cache of buffers read; None keeps nothing.
    """

    def __init__(
        self,
        client: redis_py.Redis,
        keys: Keys,
        channels: ChannelPool,
        scripts: dict[str, Any],
        *,
        signed: bool,
        cache: BufferCache | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.channels = channels
        self.scripts = scripts
        self.signed = signed
        self.cache = cache

    def part_keys(self, ref: Ref) -> list[str]:
        return [self.keys.blob(ref.name, i) for i in range(parts(ref.size))]

    # -- writing ---------------------------------------------------------------------------
    def held(self, refs: Sequence[Ref], keep_ms: int) -> set[str]:
        """The names of the buffers among ``refs`` that Redis holds whole; each is kept ``keep_ms`` more.

        One round trip (``touch.lua``).
        """
        keys = [key for ref in refs for key in self.part_keys(ref)]
        with self.channels.channel() as channel:
            flags = iter(call_script(channel, self.scripts["touch"], keys, [max(keep_ms, 1)]))
        return {ref.name for ref in refs if all([next(flags) for _ in range(parts(ref.size))])}

    # -- queueing (in the transaction that stores the records) ----------------------------
    def enqueue(self, task: RedisTask, enc: Encoded, into: str | None = None) -> tuple[Any, ...]:
        """The command that queues ``task`` (on ``into``, else its queue).

        An RPUSH, or ``enqueue.lua``, which queues it only once its buffers are all there.
        """
        queue = into or self.keys.queue(task.name)
        if not enc.named:
            return ("RPUSH", queue, task.id)
        keys = [queue, *enc.named]
        # EVAL, not EVALSHA: in a transaction, a NOSCRIPT would only show once all was sent.
        script = self.scripts["enqueue"].script
        return ("EVAL", script, len(keys), *keys, task.id, keep_ms(frames_until(task.expiry)))

    def enqueue_the_rest(
        self,
        records: Sequence[tuple[RedisTask, Encoded]],
        queued: Sequence[Any],
        what: Callable[[Sequence[tuple[RedisTask, Encoded]]], str],
        into: str | None = None,
    ) -> None:
        """Send the buffers that vanished between the question and the store, then queue their tasks.

        ``queued`` holds each record's reply to :meth:`enqueue`: 1, or the keys it found missing;
        ``what`` names records for an error.
        """
        for _ in range(3):
            pairs = zip(records, queued, strict=True)
            waiting = [(t, enc, reply) for (t, enc), reply in pairs if isinstance(reply, list)]
            if not waiting:
                return
            blobs: list[tuple[Any, ...]] = []
            commands: list[tuple[Any, ...]] = [("MULTI",)]
            queueing = []
            for task, enc, missing in waiting:
                gone = {k.decode() if isinstance(k, bytes) else str(k) for k in missing}
                enc.send = {ref.name for ref, _, keys in enc.blobs if gone.intersection(keys)}
                blobs += enc.blob_commands(task.expiry)
                commands.append(self.enqueue(task, enc, into))
                queueing.append(len(commands) - 2)
            commands.append(("EXEC",))
            with self.channels.channel() as channel:
                raise_errors(channel.pipeline(blobs), what([(t, e) for t, e, _ in waiting]))
                replies = channel.pipeline(commands)
            records = [(t, e) for t, e, _ in waiting]
            raise_errors(replies, what(records))
            queued = [replies[-1][i] for i in queueing]
        raise SerializationError(
            f"the buffers of {what(records)} vanish from Redis as soon as they are stored: is it evicting keys "
            "(maxmemory-policy) or out of memory?"
        )

    # -- reading ---------------------------------------------------------------------------
    def fetch(self, refs: list[Ref], where: str) -> list[Any]:
        """The buffers ``refs`` name, in order, each checked against its digest.

        Raises:
            SerializationError: one is missing from Redis (expired, evicted) or corrupted.
            SignatureError: one is not the buffer its signed digest names.
        """
        out: dict[int, Any] = {}
        missing = []
        for n, ref in enumerate(refs):
            cached = self.cache.get(ref.name, as_bytes=ref.as_bytes) if self.cache is not None else None
            if cached is not None:
                out[n] = cached
            else:
                missing.append(n)
        if missing:
            read = self._read([refs[n] for n in missing], where)
            out.update(zip(missing, read, strict=True))
        return [out[n] for n in range(len(refs))]

    def _read(self, refs: list[Ref], where: str) -> list[Any]:
        keys = [self.part_keys(ref) for ref in refs]
        flat = [key for part_keys in keys for key in part_keys]
        held: list[Slot | bytes | bytearray] = []

        def targets(lengths: list[Any]) -> list[memoryview]:
            at = 0
            for ref, part_keys in zip(refs, keys, strict=True):
                want = [min(CHUNK, ref.size - i * CHUNK) for i in range(len(part_keys))]
                have = lengths[at : at + len(part_keys)]
                at += len(part_keys)
                if have != want:
                    raise SerializationError(
                        f"buffer {ref.index} of the payload{where} ({size_text(ref.size)}, digest {ref.name[:19]}…) is "
                        "no longer in Redis (expired or evicted): send it again"
                    )
            views = []
            for ref in refs:  # allocated only now that Redis holds what the envelope says
                memory: Slot | bytes | bytearray
                if ref.as_bytes or self.cache is None or not self.cache.fits(ref.size):
                    memory, view = read_target(ref.size, ref.as_bytes)  # a bytes object's own: no copy later
                else:
                    memory = Slot(ref.size)
                    view = memory.view()
                held.append(memory)
                views += [view[i : i + CHUNK] for i in range(0, ref.size, CHUNK)]
            return views

        try:
            with self.channels.channel() as channel:
                complete = channel.read_into(("MGET", *flat), targets, measure=[("STRLEN", k) for k in flat])
            if not complete:  # changed between its length and its read
                raise SerializationError(f"a buffer of the payload{where} changed in Redis while it was read")
            out = []
            for ref, memory in zip(refs, held, strict=True):
                try:
                    check(ref, memory.map if isinstance(memory, Slot) else memory, where, signed=self.signed)
                except Exception:
                    self.redis.delete(*self.part_keys(ref))  # the next payload naming it sends it again
                    raise
                if self.cache is not None and isinstance(memory, Slot):
                    memory = self.cache.put(ref.name, memory)
                elif self.cache is not None and isinstance(memory, bytes):
                    memory = self.cache.put_bytes(ref.name, memory)
                out.append(memory)
            held.clear()
            return out
        finally:
            for memory in held:  # not kept (an error): give the memory back now
                if isinstance(memory, Slot):
                    memory.close()

    # -- accounting ------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """``{"buffers", "keys", "bytes"}`` the namespace holds by digest (a ``SCAN``, then ``STRLEN``s)."""
        keys = list(self.redis.scan_iter(match=self.keys.blob_pattern(), count=1000))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        sizes = pipe.execute() if keys else []
        names = {bytes(key).rsplit(b":", 1)[0] for key in keys}
        return {"buffers": len(names), "keys": len(keys), "bytes": int(sum(sizes))}


def keep_ms(at: float) -> int:
    """Milliseconds from now until ``at`` (Unix seconds), at least 1."""
    return max(1, int((at - time.time()) * 1000))
