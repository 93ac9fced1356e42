"""Group commit: the script calls of concurrent threads share one round trip.

A worker's task threads each end with one ``finish.lua`` call. Sent one by one, a burst of
short tasks pays a round trip (and on a busy machine a context switch) per task. Here a
caller whose call finds no send in flight sends at once, so a lone call waits for nothing;
calls made while a send is in flight queue up and leave together, in one pipeline, with the
next send.

Calls go by SHA alone over one held connection (:mod:`rtq.backend.wire`); a call answered NOSCRIPT
(a restarted or flushed server) did not run, and is made again once the script is loaded. Durable
writes (:mod:`rtq.backend.durability`) end each send with one ``WAIT``, in the same round trip.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis as redis_py

from .durability import Ack
from .wire import Channel, call_script

__all__ = ["GroupCommit"]


class _Call:
    __slots__ = ("args", "done", "error", "keys", "reply", "script")

    def __init__(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.done = False
        self.reply: Any = None
        self.error: BaseException | None = None


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
            commands = [("EVALSHA", item.script.sha, len(item.keys), *item.keys, *item.args) for item in batch]
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
