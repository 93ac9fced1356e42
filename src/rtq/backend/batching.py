"""Group commit: the script calls of concurrent threads share one round trip.

A worker's task threads each end with one ``finish.lua`` call. Sent one by one, a burst of
short tasks pays a round trip (and on a busy machine a context switch) per task. Here a
caller whose call finds no send in flight sends at once, so a lone call waits for nothing;
calls made while a send is in flight queue up and leave together, in one pipeline, with the
next send (:class:`GroupCommit`).

A loop in *one* thread (``[ex.submit(f, i) for i in range(n)]``) never has two calls at once:
each waits for its reply before the next is made. :class:`SendAhead` lets its caller go on
without the reply: a call that finds nothing in flight is written at once, from the caller's
thread (a lone call waits for nothing, and a failure to write raises there), and a helper
thread reads its reply; calls made meanwhile queue up, and the helper sends them in one
pipeline as soon as that reply is in. Each reply goes to its call's callback.

Calls go by SHA alone over one held connection (:mod:`rtq.backend.wire`); a call answered NOSCRIPT
(a restarted or flushed server) did not run, and is made again once the script is loaded. Durable
writes (:mod:`rtq.backend.durability`) end each send with one ``WAIT``, in the same round trip.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis as redis_py

from .durability import Ack
from .wire import Channel, call_script, pid

__all__ = ["GroupCommit", "SendAhead"]

logger = logging.getLogger("rtq.client")

Replied = Callable[[Any, "BaseException | None"], object]
"""A sent-ahead call's callback: ``(reply, None)``, or ``(None, error)`` when it failed."""


class _Call:
    __slots__ = ("args", "done", "error", "keys", "replied", "reply", "script")

    def __init__(self, script: Any, keys: Sequence[Any], args: Sequence[Any], replied: Replied | None = None) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.done = False
        self.reply: Any = None
        self.error: BaseException | None = None
        self.replied = replied

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


class GroupCommit:
    """Runs script calls from many threads, batching those that arrive while a send is in flight.

    Args:
        client: The redis-py client to send through.
        limit: Most calls in one pipeline.
        ack: Wait for a replica to acknowledge each send (``durable=True``).
    """

    def __init__(self, client: redis_py.Redis, limit: int = 256, *, ack: Ack | None = None) -> None:
        self.client = client
        self.ack = ack
        self.channel = Channel(client)  # used by the one sending thread at a time
        self.limit = limit
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._sending = False

    def call(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script(keys=keys, args=args)``, possibly sent along with other threads' calls.

        Raises what the call raised on its own (connection errors included).
        """
        call = _Call(script, keys, args)
        with self._cond:
            self._pending.append(call)
            while not call.done:
                if self._sending:
                    self._cond.wait()
                    continue
                batch, self._pending = self._pending[: self.limit], self._pending[self.limit :]
                self._sending = True
                self._cond.release()
                try:
                    self._send(batch)
                finally:
                    self._cond.acquire()
                    self._sending = False
                    for item in batch:
                        item.done = True
                    self._cond.notify_all()
        if call.error is not None:
            raise call.error
        return call.reply

    def _send(self, batch: list[_Call]) -> None:
        try:
            if self.channel.stale():  # the server closed it while it sat idle (a restart)
                self.channel.reset()
            if len(batch) == 1 and self.ack is None:
                only = batch[0]
                only.reply = call_script(self.channel, only.script, only.keys, only.args)
                return
            commands = [item.command() for item in batch]
            replies = self.channel.pipeline(commands if self.ack is None else [*commands, self.ack.command])
        except BaseException as exc:
            for item in batch:
                item.error = exc
            return
        acked = replies.pop() if self.ack is not None else None
        reloaded = False
        for item, reply in zip(batch, replies, strict=True):
            if isinstance(reply, redis_py.exceptions.NoScriptError):
                reloaded = True
                try:
                    reply = call_script(self.channel, item.script, item.keys, item.args)
                except BaseException as exc:
                    item.error = exc
                    continue
            if isinstance(reply, Exception):
                item.error = reply
            else:
                item.reply = reply
        if self.ack is not None:
            self._acknowledged(self.ack, batch, acked, again=reloaded)

    def _acknowledged(self, ack: Ack, batch: list[_Call], acked: Any, *, again: bool) -> None:
        """Check the send's ``WAIT`` (sent once more after calls made again past a NOSCRIPT)."""
        try:
            if again:
                acked = self.channel.execute(*ack.command)
            ack.check(acked, f"{len(batch)} write(s)")
        except BaseException as exc:
            for item in batch:
                if item.error is None:
                    item.error = exc


class SendAhead:
    """Runs script calls without making their callers wait for the replies.

    Args:
        client: The redis-py client to send through (one held connection of its pool).
        limit: Most calls in one pipeline.
        linger: Seconds the helper thread waits for more calls before it ends.
    """

    def __init__(self, client: redis_py.Redis, limit: int = 500, linger: float = 5.0) -> None:
        self.client = client
        self.limit = limit
        self.linger = linger
        self._cond = threading.Condition()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        # A forked child starts afresh: its parent's calls and connection are not its own.
        self._pid = pid()
        self.channel = Channel(self.client)
        self._pending: list[_Call] = []
        self._busy = False  # someone owns the channel: writing, or a written batch is unread
        self._unread: list[_Call] | None = None  # the batch written, whose replies the helper reads next
        self._helper: threading.Thread | None = None

    def call(self, script: Any, keys: Sequence[Any], args: Sequence[Any], replied: Replied) -> None:
        """Send ``script(keys=keys, args=args)``; ``replied`` gets its reply, from the helper thread.

        Returns at once. A call written by this thread raises here if the write fails (nothing of
        it reached Redis, and ``replied`` is not called); every later failure goes to ``replied``.
        """
        call = _Call(script, keys, args, replied)
        with self._cond:
            if self._pid != pid():
                self._reset()
            if self._busy:
                self._pending.append(call)  # the helper sends it with the next batch
                return
            self._busy = True
        try:
            self._write([call])
        except BaseException:
            self._written([])  # nothing to read; the helper sends what queued up meanwhile
            raise
        self._written([call])

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every call made so far has its reply; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._busy and self._pid == pid():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _write(self, batch: list[_Call]) -> None:
        if self.channel.stale():  # the server closed it while it sat idle (a restart)
            self.channel.reset()
        self.channel.send([item.command() for item in batch])

    def _written(self, batch: list[_Call]) -> None:
        """Hand a written batch (or none, after a failed write) to the helper, started if need be."""
        with self._cond:
            if not batch and not self._pending:
                self._busy = False
                self._cond.notify_all()
                return
            self._unread = batch
            if self._helper is None:
                self._helper = threading.Thread(target=self._run, name="rtq-send-ahead", daemon=True)
                self._helper.start()
            self._cond.notify_all()

    def _run(self) -> None:
        """The helper: read each batch's replies, then send what queued up meanwhile."""
        while True:
            with self._cond:
                if self._unread is None and not self._cond.wait_for(lambda: self._unread is not None, self.linger):
                    self._helper = None  # the next batch starts another
                    return
                batch, self._unread = self._unread or [], None
            self._deliver(batch, self._replies(batch))
            while True:
                with self._cond:
                    batch, self._pending = self._pending[: self.limit], self._pending[self.limit :]
                    if not batch:
                        self._busy = False
                        self._cond.notify_all()
                        break
                try:
                    self._write(batch)
                except BaseException as exc:
                    self._deliver(batch, [exc] * len(batch))
                    continue
                with self._cond:
                    self._unread = batch
                break

    def _replies(self, batch: list[_Call]) -> list[Any]:
        """The replies of a written batch (a call the server lost its script for is made again)."""
        if not batch:
            return []
        try:
            replies = self.channel.receive(len(batch))
        except BaseException as exc:  # connection lost: whether the calls ran is unknown
            return [exc] * len(batch)
        for i, (item, reply) in enumerate(zip(batch, replies, strict=True)):
            if isinstance(reply, redis_py.exceptions.NoScriptError):  # a restarted or flushed server
                try:
                    replies[i] = call_script(self.channel, item.script, item.keys, item.args)
                except BaseException as exc:
                    replies[i] = exc
        return replies

    @staticmethod
    def _deliver(batch: list[_Call], replies: list[Any]) -> None:
        for item, reply in zip(batch, replies, strict=True):
            assert item.replied is not None
            try:
                if isinstance(reply, BaseException):
                    item.replied(None, reply)
                else:
                    item.replied(reply, None)
            except Exception:  # one broken callback must not strand the calls behind it
                logger.exception("a sent-ahead call's callback failed")


_live: weakref.WeakSet[SendAhead] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    """At exit, send what is still queued: a submitted call is never dropped with the process."""
    for ahead in list(_live):
        ahead.flush(timeout=10.0)
