"""Big ``bytes``, ``bytearray`` and ``memoryview`` objects travel out of band, like numpy buffers.

Pickle protocol 5 sends a buffer *out of band* (as a frame of its own next to the pickle stream,
never copied into it) only when the object hands the pickler a ``pickle.PickleBuffer``: numpy
arrays do, the built-in bytes-like types do not. File contents, encoded images and serialized
models are shipped as ``bytes`` all the time, and copying 32 MiB into the stream and out again
cost them two thirds of an array's speed. From ``MIN_SIZE`` bytes on they go out of band too,
and come back as the same type:

* ``bytes`` and ``bytearray``: the pickler never asks anyone how to pickle them (neither
  ``reducer_override`` nor a dispatch table is consulted for them, and ``persistent_id`` would
  cost every object of every payload a Python call). But both of CPython's picklers write an
  object of 64 KiB or more *straight to the file*, right after its opcode and length, without
  copying it into their buffer. :class:`Stream` is that file: when a big bytes or bytearray
  arrives whole, just after exactly the header that announces it, it replaces that header with
  opcodes that load the object from the next out-of-band buffer (through :func:`restore_bytes`
  or :func:`restore_bytearray`) and hands the object to the buffer callback. Anything else is
  written as it came, so a pickler that did otherwise would only keep the object in band.
* ``memoryview`` (which plain pickle refuses): :func:`reduce_memoryview`, a dispatch-table entry,
  sends its bytes (a ``PickleBuffer`` of the view itself when it is big and contiguous) with its
  format, shape and read-only flag; :func:`restore_memoryview` rebuilds it. A format that
  ``memoryview.cast`` cannot make (a non-native one such as ``"<i"``, a struct) comes back as a
  flat view of unsigned bytes (format ``"B"``), its shape lost.

A ``bytes`` object comes back as ``bytes`` without a copy either: its envelope marks its buffer
as a ``bytes`` one, and the reader reads it from the socket straight into a new ``bytes`` object
(:func:`read_target`) instead of into a ``bytearray`` it would then have to copy (for 32 MiB,
about 16 ms on a 2-core VM, most of it faulting in the copy's fresh pages). A ``bytearray`` or a
``memoryview`` comes back without a copy too.
"""

from __future__ import annotations

import ctypes
import io
import pickle
import platform
import struct
from collections.abc import Callable
from typing import Any

__all__ = [
    "MIN_SIZE",
    "Stream",
    "read_target",
    "reduce_memoryview",
    "restore_bytearray",
    "restore_bytes",
    "restore_memoryview",
]

MIN_SIZE = 1 << 20
"""Smallest bytes-like object that travels out of band; smaller ones stay in the pickle stream."""

# The headers the picklers write just before an object they write straight to the file.
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_HEADERS: dict[type, tuple[tuple[bytes, struct.Struct], ...]] = {
    bytes: ((pickle.BINBYTES, _U32), (pickle.BINBYTES8, _U64)),
    bytearray: ((pickle.BYTEARRAY8, _U64),),
}


def _loader(name: str) -> bytes:
    """The opcodes that push ``restore_<name>(next out-of-band buffer)`` in place of the object."""
    return b"c" + __name__.encode() + b"\n" + name.encode() + b"\n" + pickle.NEXT_BUFFER + pickle.TUPLE1 + pickle.REDUCE


_LOADERS: dict[type, bytes] = {bytes: _loader("restore_bytes"), bytearray: _loader("restore_bytearray")}


class Stream:
    """The file a payload is pickled into: big ``bytes`` and ``bytearray`` objects are lifted out.

    Args:
        buffer_callback: Called with a ``pickle.PickleBuffer`` of each object lifted out, in
            stream order with the pickler's own out-of-band buffers (the pickler's own
            ``buffer_callback`` must be the same function).
    """

    def __init__(self, buffer_callback: Callable[[pickle.PickleBuffer], Any]) -> None:
        self._out = io.BytesIO()
        self._last: bytes = b""
        self._callback = buffer_callback

    def write(self, data: Any) -> int:
        size = len(data)
        kind = type(data)
        if size >= MIN_SIZE and kind in _HEADERS and self._lift(kind, data, size):
            return size
        self._out.write(data)
        self._last = data
        return size

    def _lift(self, kind: type, data: bytes | bytearray, size: int) -> bool:
        """Replace the header just written for ``data`` by an out-of-band load; False if there is none."""
        for opcode, length in _HEADERS[kind]:
            header_size = len(opcode) + length.size
            tail = self._last[-header_size:]
            announced = length.unpack(tail[len(opcode) :]) if len(tail) == header_size else None
            if tail[: len(opcode)] == opcode and announced == (size,):
                self._out.seek(-header_size, io.SEEK_END)
                self._out.truncate()
                self._out.write(_LOADERS[kind])
                self._last = b""
                self._callback(pickle.PickleBuffer(data))
                return True
        return False

    def getvalue(self) -> bytes:
        """The pickle stream written so far."""
        return self._out.getvalue()


def _c_api() -> tuple[Any, Any] | None:
    """CPython's ``PyBytes_FromStringAndSize`` and ``PyBytes_AsString``, or None on another Python."""
    if platform.python_implementation() != "CPython":  # pragma: no cover - PyPy and others
        return None
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    data = ctypes.pythonapi.PyBytes_AsString
    data.restype, data.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    return new, data


_C_API = _c_api()


def read_target(size: int, as_bytes: bool) -> tuple[bytes | bytearray, memoryview]:
    """Memory to read a buffer of ``size`` bytes into from a socket, and a writable view of it.

    A buffer that was a ``bytes`` object lands in a new ``bytes`` object, rebuilt without a copy:
    C code makes a ``bytes`` object it fills itself with ``PyBytes_FromStringAndSize(NULL, n)``,
    whose contents the C API documents as uninitialized and writable until the object is shared,
    and this does the same through ``ctypes``. Such an object must be filled in full through the
    view, and the view dropped, before it is handed on; it must outlive the view. Any other
    buffer, and a ``bytes`` one off CPython or under ``MIN_SIZE`` (the empty and one-byte objects
    are shared), lands in a ``bytearray``, which what is built over it (an array) may write to
    (and which :func:`restore_bytes` copies).
    """
    if as_bytes and _C_API is not None and size >= MIN_SIZE:
        new, data = _C_API
        obj = new(None, size)
        return obj, memoryview((ctypes.c_char * size).from_address(data(obj))).cast("B")
    memory = bytearray(size)
    return memory, memoryview(memory)


def restore_bytes(buffer: Any) -> bytes:
    """A ``bytes`` object from its out-of-band buffer."""
    return buffer if type(buffer) is bytes else bytes(buffer)


def restore_bytearray(buffer: Any) -> bytearray:
    """A ``bytearray`` from its out-of-band buffer (the buffer itself when it is one)."""
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def reduce_memoryview(view: memoryview) -> tuple[Any, ...]:
    """How a ``memoryview`` pickles: its bytes (out of band when big), format, shape, read-only flag."""
    data: Any
    if view.nbytes >= MIN_SIZE and view.c_contiguous:
        data = pickle.PickleBuffer(view)  # out of band, uncopied
    else:
        data = view.tobytes()  # in band, or lifted out by Stream when it is big
    return restore_memoryview, (data, view.format, view.shape, view.readonly)


def restore_memoryview(data: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    """The ``memoryview`` :func:`reduce_memoryview` described, over ``data``'s bytes.

    Writable when the original was (on a buffer of its own), read-only when it was; with its
    format and shape when ``memoryview.cast`` can make them, else flat unsigned bytes.
    """
    view = memoryview(data)
    if not readonly and view.readonly:
        view = memoryview(bytearray(view))
    if readonly and not view.readonly:
        view = view.toreadonly()
    flat = view.cast("B")
    try:
        return flat.cast(fmt, shape)  # type: ignore[call-overload]  # any native format, checked at run time
    except (TypeError, ValueError):  # a format cast cannot make ("<i", a struct): flat bytes
        return flat
