"""RESP on a socket: commands packed, replies parsed, big values moved without copies.

What :class:`rtq.backend.wire.Channel` sends and reads with. With hiredis 3 installed (the
``fast`` extra) small commands are packed and whole replies parsed in C; otherwise, and always
for payload frames read straight into their buffers (:meth:`Reader.bulks_into`), rtq's own code
does it. Failures come out as the errors redis-py raises (``ConnectionError``, ``TimeoutError``,
``ResponseError`` and its kinds), which rtq's callers already handle.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis as redis_py

__all__ = ["BIG_ARG", "READ_SIZE", "Reader", "hiredis", "pack"]

hiredis: Any = None
try:  # optional (the ``fast`` extra): RESP packing and parsing in C; 3.0 reads RESP3 too
    import hiredis as _hiredis

    if int(_hiredis.__version__.split(".")[0]) >= 3:
        hiredis = _hiredis
except (ImportError, ValueError):  # pragma: no cover - depends on the environment
    pass

BIG_ARG = 1 << 16
"""Arguments bigger than this are sent as they are, not copied into the packed command."""
READ_SIZE = 1 << 16


@contextmanager
def _reading() -> Iterator[None]:
    """Turn socket failures into the errors redis-py raises, which rtq's callers retry."""
    try:
        yield
    except TimeoutError as exc:
        raise redis_py.TimeoutError("Timeout reading from socket") from exc
    except OSError as exc:
        raise redis_py.ConnectionError(f"Error while reading from socket: {exc}") from exc


def pack(commands: Sequence[Sequence[Any]], encoding: str) -> list[Any] | None:
    """RESP for ``commands`` as pieces to send in order, big values as they are (never copied).

    None when an argument is of a type redis-py should judge (it raises its own error).
    """
    pieces: list[Any] = []
    small: list[bytes] = []
    for args in commands:
        if hiredis is not None and encoding == "utf-8" and _small(args):
            small.append(hiredis.pack_command(tuple(args)))  # in C: several times faster
            continue
        small.append(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode(encoding)
            elif isinstance(arg, (bytes, bytearray, memoryview)):
                pass
            elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
                arg = repr(arg).encode()
            else:
                return None
            size = arg.nbytes if isinstance(arg, memoryview) else len(arg)
            if size > BIG_ARG:
                small.append(b"$%d\r\n" % size)
                pieces += (b"".join(small), arg)
                small = [b"\r\n"]
            else:
                small += (b"$%d\r\n" % size, bytes(arg), b"\r\n")
    pieces.append(b"".join(small))
    return pieces


def _typed_errors(reply: Any) -> Any:
    """``reply`` with hiredis's plain ``ResponseError``s as redis-py's own kinds (NOSCRIPT…)."""
    if isinstance(reply, redis_py.ResponseError):
        message = str(reply)
        kind = _ERRORS.get(message.split(" ", 1)[0])
        return kind(message) if kind is not None else reply
    if isinstance(reply, list):
        return [_typed_errors(item) if isinstance(item, (list, redis_py.ResponseError)) else item for item in reply]
    return reply


def _small(args: Sequence[Any]) -> bool:
    """Whether hiredis may pack ``args``: only str, int, float and ``bytes`` up to ``BIG_ARG``.

    hiredis also takes buffers (memoryviews of payload frames), but copies them slowly: about
    1 ms per MiB, three times the transfer itself. A ``str`` subclass (a ``TaskState``, in every
    submit and outcome) is packed as its text, as :func:`_pack` would.
    """
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            if len(arg) > BIG_ARG:
                return False
        elif kind is not str and kind is not int and kind is not float and not isinstance(arg, str):
            return False
    return True


_MORE = object()
"""hiredis's answer while a reply is incomplete (its default, False, is also a RESP3 boolean)."""

_ERRORS = {
    "NOSCRIPT": redis_py.exceptions.NoScriptError,
    "LOADING": redis_py.exceptions.BusyLoadingError,
    "OOM": redis_py.exceptions.OutOfMemoryError,
    "EXECABORT": redis_py.exceptions.ExecAbortError,
}


class Reader:
    """Reads RESP2/RESP3 replies from a connection's socket, with its own buffer."""

    def __init__(self, conn: Any) -> None:
        self.sock: socket.socket = conn._sock
        self.buf = bytearray()
        self.pos = 0
        # hiredis parses whole replies in C (RESP2 and RESP3). Frames read straight into
        # buffers (bulks_into) always go through rtq's own buffer.
        self.fast = None
        if hiredis is not None:
            self.fast = hiredis.Reader(
                replyError=redis_py.ResponseError, protocolError=redis_py.ConnectionError, notEnoughData=_MORE
            )

    def pending(self) -> bool:
        """Whether bytes beyond the replies read are buffered (else the buffer is emptied)."""
        if self.fast is not None and self.fast.has_data():
            return True
        if self.pos < len(self.buf):
            return True
        if len(self.buf) > READ_SIZE:
            self.buf = bytearray()  # do not keep a big reply's buffer around
        else:
            self.buf.clear()
        self.pos = 0
        return False

    def _fill(self) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        with _reading():
            chunk = self.sock.recv(READ_SIZE)
        if not chunk:
            raise redis_py.ConnectionError("Connection closed by server.")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return line
            self._fill()

    def _exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n + 2:
            self._fill()
        with memoryview(self.buf) as view:
            data = bytes(view[self.pos : self.pos + n])
        self.pos += n + 2
        return data

    def reply(self) -> Any:
        fast = self.fast
        if fast is None or self.pos < len(self.buf):
            return self._reply()
        reply = fast.gets()
        while reply is _MORE:
            with _reading():
                chunk = self.sock.recv(READ_SIZE)
            if not chunk:
                raise redis_py.ConnectionError("Connection closed by server.")
            fast.feed(chunk)
            reply = fast.gets()
        return _typed_errors(reply)

    def own_reply(self) -> Any:
        """The next reply, parsed from rtq's own buffer (never through hiredis's)."""
        return self._reply()

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind in (b"*", b"~", b">"):
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        if kind == b":" or kind == b"(":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"_":
            return None
        if kind in (b"-", b"!"):
            message = (self._exact(int(rest)) if kind == b"!" else rest).decode(errors="replace")
            return _ERRORS.get(message.split(" ", 1)[0], redis_py.ResponseError)(message)
        if kind == b"%":
            n = int(rest)
            out = {}
            for _ in range(n):
                k = self._reply()
                out[k] = self._reply()
            return out
        if kind == b",":
            return float(rest)
        if kind == b"#":
            return rest == b"t"
        if kind == b"=":
            return self._exact(int(rest))[4:]
        if kind == b"|":  # attributes: skip them, the reply follows
            for _ in range(2 * int(rest)):
                self._reply()
            return self._reply()
        raise redis_py.ConnectionError(f"unexpected reply from the server: {line[:40]!r}")

    def bulks_into(self, targets: Sequence[memoryview]) -> bool:
        """Read an array reply of bulk strings, each straight into its target."""
        head = self._line()
        if head[:1] not in (b"*", b"~") or int(head[1:]) != len(targets):
            raise redis_py.ConnectionError(f"unexpected reply to a read of frames: {head[:40]!r}")
        ok = True
        for target in targets:
            line = self._line()
            if line[:1] != b"$" or int(line[1:]) != target.nbytes:
                ok = False  # missing or another size: read it (and drop it) to stay in step
                if line[:1] == b"$" and int(line[1:]) >= 0:
                    self._skip(int(line[1:]) + 2)
                continue
            self._into(target)
            self._skip(2)
        return ok

    def _into(self, target: memoryview) -> None:
        have = min(len(self.buf) - self.pos, target.nbytes)
        target[:have] = self.buf[self.pos : self.pos + have]
        self.pos += have
        done = have
        while done < target.nbytes:
            with _reading():
                n = self.sock.recv_into(target[done:])
            if not n:
                raise redis_py.ConnectionError("Connection closed by server.")
            done += n

    def _skip(self, n: int) -> None:
        while n:
            if self.pos >= len(self.buf):
                self._fill()
            step = min(n, len(self.buf) - self.pos)
            self.pos += step
            n -= step
        if self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
