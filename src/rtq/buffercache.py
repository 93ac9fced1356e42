"""A worker's cache of recently used buffers, keyed by digest, bounded in bytes, least recently used out.

The second task given the same array skips even the read from Redis: its buffer is here,
verified when it was read. Each task gets a *copy-on-write* mapping of the cached bytes (an
``mmap`` with ``ACCESS_COPY`` of an in-memory file): nothing is copied up front, and a task that
writes into its argument (``x -= x.mean()``) changes its own pages only, never what the next
task gets. A buffer read from Redis lands in such a file directly (:meth:`BufferCache.slot`),
so filling the cache costs no copy either.

Evicting an entry closes the cache's file; pages a running task still maps stay alive until
that task lets go of them (the kernel counts the references), so eviction never pulls memory
out from under a task.

A buffer that was a ``bytes`` object is kept as that ``bytes`` object (immutable, so every task
can be given the very same one); asked for as a writable buffer it is copied, and a file entry
asked for as ``bytes`` is read into a new one (``os.pread``: one copy, no mapping).

What this is NOT: shared between processes (each worker process has its own), or a store of
anything unverified (only a buffer whose bytes matched its digest is put in).
"""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["BufferCache", "SharedBuffer", "Slot", "default_cache_bytes"]

DEFAULT_CAP = 4 << 30
"""The default cache never holds more than this, however much memory the machine has."""


def default_cache_bytes() -> int:
    """A quarter of this machine's memory, at most ``DEFAULT_CAP`` (``rtq worker --cache-bytes``'s default)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: a modest guess
        total = 4 << 30
    return min(total // 4, DEFAULT_CAP)


class SharedBuffer(mmap.mmap):
    """A copy-on-write mapping of cached bytes, as a task gets it: any buffer's stand-in.

    Arrays and the like are built over it without a copy. Shipped on (a task returning a raw
    ``pickle.PickleBuffer`` it was given), it travels as the ``bytearray`` of its bytes.
    """

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if isinstance(protocol, int) and protocol >= 5:
            return bytearray, (pickle.PickleBuffer(self),)  # out of band when the pickler takes buffers
        return bytearray, (bytes(self),)


class Slot:
    """Memory for one buffer about to be read from Redis, in a file the cache can keep."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = _memory_file(size)
        self.map = mmap.mmap(self.fd, max(size, 1), access=mmap.ACCESS_WRITE)

    def view(self) -> memoryview:
        """Where the bytes are read into."""
        return memoryview(self.map)[: self.size]

    def copy_on_write(self) -> Any:
        """A private mapping of the bytes: writes to it stay in it."""
        return _private(self.fd, self.size)

    def close(self) -> None:
        self.release()
        os.close(self.fd)

    def release(self) -> None:
        """Drop the writable mapping (the file keeps the bytes)."""
        try:
            self.map.close()
        except BufferError:  # a view of it is still alive somewhere: it goes when that does
            pass


class BufferCache:
    """Verified buffers by digest name, at most ``max_bytes`` in all (0: keeps nothing).

    Thread-safe: a worker's tasks are decoded in several threads.
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"cache size must be a whole number of bytes, 0 or more, not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.used = 0
        self.hits = 0
        # name: (file descriptor, size), or the bytes object itself
        self._entries: OrderedDict[str, tuple[int, int] | bytes] = OrderedDict()
        self._lock = threading.Lock()

    def fits(self, size: int) -> bool:
        """Whether a buffer of ``size`` bytes would be kept at all."""
        return 0 < size <= self.max_bytes

    def get(self, name: str, *, as_bytes: bool = False) -> Any | None:
        """The buffer named ``name``, or None when it is not here.

        A private, writable buffer (a copy-on-write mapping); with ``as_bytes``, a ``bytes``
        object of its bytes.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            self._entries.move_to_end(name)
            self.hits += 1
            if isinstance(entry, bytes):
                return entry if as_bytes else bytearray(entry)
            fd, size = entry
            return _read_file(fd, size) if as_bytes else _private(fd, size)

    def put(self, name: str, slot: Slot) -> Any:
        """Keep ``slot``'s verified bytes as ``name``; returns the mapping the caller uses from now on."""
        buffer = slot.copy_on_write()
        slot.release()  # the file holds the pages; the cache needs no mapping of its own
        if not self._keep(name, (slot.fd, slot.size), slot.size):
            os.close(slot.fd)
        return buffer

    def put_bytes(self, name: str, data: bytes) -> bytes:
        """Keep the verified ``bytes`` object ``data`` as ``name``; returns it."""
        self._keep(name, data, len(data))
        return data

    def _keep(self, name: str, entry: tuple[int, int] | bytes, size: int) -> bool:
        """Add ``entry`` unless ``name`` is here already or it does not fit; evict the least recently used."""
        with self._lock:
            if name in self._entries or not self.fits(size):
                return False
            self._entries[name] = entry
            self.used += size
            while self.used > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.used -= _release(old)
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                _release(entry)
            self._entries.clear()
            self.used = 0

    def __del__(self) -> None:
        for entry in getattr(self, "_entries", {}).values():
            _release(entry)


def _release(entry: tuple[int, int] | bytes) -> int:
    """Close an entry's file (a bytes entry has none); returns the bytes it held."""
    if isinstance(entry, bytes):
        return len(entry)
    fd, size = entry
    os.close(fd)
    return size


def _read_file(fd: int, size: int) -> bytes:
    """The ``size`` bytes of the file ``fd`` as a new ``bytes`` object (read into it by the kernel)."""
    data = os.pread(fd, size, 0)
    if len(data) == size:
        return data
    parts, at = [data], len(data)  # a single read stops short of 2 GiB on Linux
    while at < size:
        part = os.pread(fd, size - at, at)
        if not part:
            raise OSError(f"the cached buffer ended after {at} of {size} bytes")
        parts.append(part)
        at += len(part)
    return b"".join(parts)


def _memory_file(size: int) -> int:
    """The descriptor of a file of ``size`` bytes in memory (a memfd on Linux, else an unlinked temporary file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("rtq-buffer", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS and others
        fd, path = tempfile.mkstemp(prefix="rtq-buffer-")
        os.unlink(path)
    os.ftruncate(fd, max(size, 1))
    return fd


def _private(fd: int, size: int) -> SharedBuffer:
    return SharedBuffer(fd, max(size, 1), access=mmap.ACCESS_COPY)
