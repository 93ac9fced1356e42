"""Code shipped by value keeps its file name, and code from a notebook cell takes its lines along.

cloudpickle ships a function defined in a notebook (or ``__main__``) by value, and renames its
code objects' file to ``<dynamic-code>`` (so that its payloads pickle alike wherever the function
was defined). On a worker, an error or a warning raised in that code then reads
``File <dynamic-code>:2`` with no source, and the notebook cannot tell which cell it came from.

:class:`Pickler` is cloudpickle's pickler with one change: a code object travels whole
(:mod:`marshal`, which keeps every field, its file name included), and a code object whose file
lives only in memory — a notebook cell, which IPython registers in :mod:`linecache` under a name
of its own — takes those lines along (once per payload: the pickle memo shares them).
Unpickling registers them in the receiving process's :mod:`linecache`, so the worker's
tracebacks and warnings show the cell's lines, and the notebook, which knows that file name as
one of its cells, shows ``Cell In[6], line 2, in helper``. (It also pickles a ``memoryview``,
and :func:`dumps` sends big bytes-like objects out of band: see :mod:`rtq.outofband`.)

Not for: files on disk (their path travels, not their lines; the worker shows the lines if it
has the same file). Like every payload, it is read back by the same Python version (a
marshalled code object is version-specific; rtq checks workers' versions before shipping).
"""

from __future__ import annotations

import collections
import io
import linecache
import marshal
import types
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from . import funcpickles, outofband

__all__ = ["MAX_SOURCES", "Pickler", "dumps", "register_source"]

MAX_SOURCE = 256 * 1024
"""Longest in-memory source (characters) that travels with its code; longer ones stay behind."""
MAX_SOURCES = 256
"""Sources a process keeps in ``linecache`` for tracebacks of shipped code; older ones are dropped."""

_registered: collections.deque[str] = collections.deque()  # the linecache entries added here, oldest first


def _reduce_code(code: types.CodeType) -> Any:
    try:
        blob = marshal.dumps(code)  # nested code objects (inner functions, comprehensions) included
    except ValueError:  # a hand-made code object holding unmarshallable constants
        return cloudpickle.CloudPickler.dispatch_table[types.CodeType](code)
    lines = {}
    for filename in _files_of(code):
        source = _memory_source(filename)
        if source is not None:
            # linecache's own list: pickled once however many code objects of that cell go (memo)
            lines[filename] = source
    return _load_code, (blob, lines)


class _CodePickler(cloudpickle.CloudPickler):
    """cloudpickle's pickler, whose code objects keep their file name and bring in-memory source."""

    # Dispatch table entries, not a reducer_override: the other objects pay nothing.
    # One ChainMap over cloudpickle's maps (not over its ChainMap): pickle looks every object's
    # type up here, and each level is a Python-level lookup. Still live: a reducer registered with
    # copyreg later is seen.
    dispatch_table = collections.ChainMap(
        {types.CodeType: _reduce_code, memoryview: outofband.reduce_memoryview},
        *cloudpickle.CloudPickler.dispatch_table.maps,
    )


class Pickler(_CodePickler):
    """cloudpickle's pickler, whose code objects keep their file name and bring in-memory source.

    A function shipped by value is pickled once and its pickle reused while nothing in it
    changed (:mod:`rtq.funcpickles`). Takes the arguments of ``pickle.Pickler``; pickles
    whatever cloudpickle pickles.
    """

    _world: tuple[Any, ...] | None = None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType or issubclass(kind, type):
            world = self._world
            if world is None:
                world = self._world = funcpickles.world()  # once per pickler: a payload
            if funcpickles.by_reference(obj, world):
                return NotImplemented  # pickle's own: the worker imports it by name
            if kind is types.FunctionType:
                reduced = funcpickles.pickled(obj, _CodePickler, world)
                if reduced is not None:
                    loader, blob = reduced
                    return loader, (blob,)
            reduced = super().reducer_override(obj)
            if reduced is NotImplemented:
                funcpickles.remember_by_reference(obj, world)
            return reduced
        return super().reducer_override(obj)


def dumps(obj: Any, *, buffer_callback: Callable[[Any], Any] | None = None) -> bytes:
    """Pickle ``obj`` with :class:`Pickler` (protocol 5), like ``cloudpickle.dumps``.

    With a ``buffer_callback``, big bytes-like objects go out of band as well as the buffers
    that offer it (numpy arrays): see :mod:`rtq.outofband`.
    """
    out: io.BytesIO | outofband.Stream = io.BytesIO() if buffer_callback is None else outofband.Stream(buffer_callback)
    Pickler(out, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


def _load_code(blob: bytes, lines: dict[str, list[str]]) -> types.CodeType:
    for filename, source in lines.items():
        register_source(filename, source)
    code = marshal.loads(blob)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"expected a marshalled code object, got {type(code).__name__}")
    return code


def register_source(filename: str, lines: list[str] | str) -> None:
    """Put the source ``lines`` of ``filename`` into ``linecache``, never checked against the disk.

    An entry already there stays as it is (the notebook's own cells, a file on disk): the names
    IPython gives cells change with their content, so an entry under the same name holds the same
    lines. At most ``MAX_SOURCES`` entries added here are kept; the oldest go first.
    """
    if filename in linecache.cache:
        return
    if isinstance(lines, str):
        lines = [line + "\n" for line in lines.splitlines()]
    linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    _registered.append(filename)
    while len(_registered) > MAX_SOURCES:
        linecache.cache.pop(_registered.popleft(), None)


def _files_of(code: types.CodeType) -> Iterator[str]:
    """The file names of ``code`` and of the code objects nested in it."""
    seen = set()
    pending = [code]
    while pending:
        current = pending.pop()
        if current.co_filename not in seen:
            seen.add(current.co_filename)
            yield current.co_filename
        pending.extend(c for c in current.co_consts if isinstance(c, types.CodeType))


def _memory_source(filename: str) -> list[str] | None:
    """The lines ``linecache`` holds for ``filename`` when they come from no file (a notebook cell)."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:  # absent, lazy, or a file on disk
        return None
    lines = entry[2]
    if not isinstance(lines, list) or sum(map(len, lines)) > MAX_SOURCE:
        return None
    return lines
