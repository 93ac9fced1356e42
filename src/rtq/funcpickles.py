"""A function shipped by value is pickled once, and its pickle reused while nothing in it changed.

cloudpickle ships a notebook's functions by value: their code, and the globals and closure
values they read. Doing that for every call costs more of a short task's round trip than any
other step on the caller (its Python-level reducers run for each function, code object and
class the function touches), and a loop of calls ships the same function every time.

So :func:`pickled` keeps each function's pickle, and reuses it for as long as everything that
went into it is provably the same: the function's attributes (code, defaults, closure values,
name, module, annotations, an empty ``__dict__``), every global its code reads (or its absence),
cloudpickle's by-value registry and the modules it can see. Only functions whose every input is
immutable qualify — numbers, strings, bytes, tuples of those, modules and functions or classes
pickled by reference, and other functions pickled by value that qualify in turn — so that the
same objects, checked by identity, mean the same pickle. A function reading a list, a dict, an
array or an object of a class of its own (whose contents could have changed in place) is
pickled afresh every time, as before. A redefined function is a new object, and gets its own
pickle.

cloudpickle's other per-call cost is deciding, for each function and class a payload holds,
whether it goes by reference (a name the worker imports) or by value: :func:`by_reference`
keeps a "by reference" answer while the module still holds that very object under that name.

The check is a few identity comparisons per function, a small fraction of pickling it again.
The pickle travels inside the payload's as bytes. Each call unpickles its own fresh copy of the
function on the worker (:func:`load`), so nothing a task does to its function's globals outlives
the call — unless the function provably cannot change anything of its own: when no code in it
(nor in its helpers) assigns or deletes a global, an attribute or a closure variable of its
own, nor names a way around that (``globals()``, ``setattr``, ``__globals__``, frames…), the
worker unpickles it once and reuses it (:func:`load_shared`), since every call would see
exactly the same function anyway. Unpickling a function costs a short task's worker more than
any other step before it runs.
"""

from __future__ import annotations

import dis
import io
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = [
    "MAX_CONSTANT",
    "MAX_KEPT",
    "MAX_PICKLE",
    "MAX_SHARED",
    "by_reference",
    "load",
    "load_shared",
    "pickled",
    "remember_by_reference",
    "world",
]

MAX_PICKLE = 64 * 1024
"""Biggest function pickle kept (bytes); a bigger one carries data that should go out of band."""
MAX_KEPT = 1024
"""Most functions whose answers are kept (more, and all are forgotten)."""
MAX_CONSTANT = 4096
"""Longest ``str`` or ``bytes`` a kept function may read (a longer one is not kept alive here)."""
MAX_SHARED = 256
"""Most functions a worker process keeps unpickled for reuse (more, and all are forgotten)."""

_MISSING = object()  # a name the code reads that its globals do not hold (a builtin, or not yet defined)
_SCALARS = frozenset({type(None), bool, int, float, complex, type(Ellipsis), type(NotImplemented)})
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # what cloudpickle keeps of the module

# cloudpickle's own decisions, so that the checks agree with what it pickles. Without them (a
# cloudpickle that renamed them) nothing is kept, and every call pickles its function afresh.
_code_globals: Callable[[types.CodeType], Any] | None = getattr(cloudpickle.cloudpickle, "_extract_code_globals", None)
_by_reference: Callable[[Any], bool] | None = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)


class _Entry:
    """What was pickled for one function: the inputs it was made from, and the pickle.

    ``inputs`` pairs each function pickled (``None`` for the function this entry is for, which
    it must not keep alive) with everything cloudpickle read off it; only immutable objects,
    small ones, are among them (modules and functions aside). A function that does not qualify
    keeps no objects at all, only their ids (``ids``): a stale "no" costs a fresh pickle, never
    a wrong one, and a big array a function read is never kept alive by this cache.
    """

    __slots__ = ("blob", "ids", "inputs", "loader", "world")

    def __init__(self, world: tuple[Any, ...]) -> None:
        self.world = world
        self.inputs: list[tuple[types.FunctionType | None, tuple[Any, ...]]] = []
        self.ids: tuple[int, ...] | None = None
        self.blob: bytes | None = None
        self.loader: Callable[[bytes], types.FunctionType] = load

    def holds(self, fn: types.FunctionType, world: tuple[Any, ...]) -> bool:
        """True while every input is still the very object it was (and the world is the same)."""
        if world[0] != self.world[0] or world[1] != self.world[1]:
            return False
        if self.ids is not None:
            now = _inputs(fn)
            return now is not None and tuple(map(id, now)) == self.ids
        for owner, before in self.inputs:
            now = _inputs(fn if owner is None else owner)
            if now is None or len(now) != len(before):
                return False
            for a, b in zip(now, before, strict=True):
                if a is not b:
                    return False
        return True


class _ByName:
    """A function or class cloudpickle pickled by reference, and what that answer rested on."""

    __slots__ = ("module", "name", "qualname", "world")

    def __init__(self, world: tuple[Any, ...], obj: Any) -> None:
        self.world = world
        self.name = obj.__module__
        self.qualname = obj.__qualname__
        self.module = sys.modules.get(self.name)

    def holds(self, world: tuple[Any, ...], obj: Any) -> bool:
        """True while the module it names still holds ``obj`` under its name (and the world is the same)."""
        if world[0] != self.world[0] or world[1] != self.world[1]:
            return False
        module = sys.modules.get(self.name)
        if module is None or module is not self.module or obj.__module__ != self.name:
            return False
        if obj.__qualname__ != self.qualname:
            return False
        found: Any = module
        for part in self.qualname.split("."):
            found = getattr(found, part, None)
        return found is obj


_entries: weakref.WeakKeyDictionary[types.FunctionType, _Entry] = weakref.WeakKeyDictionary()
_by_name: weakref.WeakKeyDictionary[Any, _ByName] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def by_reference(obj: Any, world: tuple[Any, ...]) -> bool:
    """True when cloudpickle pickled ``obj`` (a function or class) by reference, and still would.

    False means "not known": ask cloudpickle, then :func:`remember_by_reference` its answer.
    """
    try:
        known = _by_name.get(obj)
    except TypeError:  # not weakly referenceable
        return False
    return known is not None and known.holds(world, obj)


def remember_by_reference(obj: Any, world: tuple[Any, ...]) -> None:
    """Note that cloudpickle pickles ``obj`` (a function or class) by reference (see :func:`by_reference`)."""
    if not isinstance(getattr(obj, "__module__", None), str) or not isinstance(getattr(obj, "__qualname__", None), str):
        return
    try:
        with _lock:
            _by_name[obj] = _ByName(world, obj)
    except TypeError:  # not weakly referenceable
        pass


Pickled = tuple[Callable[[bytes], types.FunctionType], bytes]


def pickled(fn: types.FunctionType, pickler: type[pickle.Pickler], world: tuple[Any, ...]) -> Pickled | None:
    """``(loader, pickle)`` of ``fn`` (made by ``pickler``), reused while nothing in it changed; None when not kept.

    The payload pickles ``loader(pickle)`` in place of ``fn``: :func:`load_shared` when ``fn``
    cannot change anything of its own, else :func:`load`. None means ``fn`` is pickled with the
    payload as usual: it goes by reference, reads something mutable, or its pickle is over
    :data:`MAX_PICKLE`. ``world`` is :func:`world`'s answer, taken once per payload.
    """
    if _code_globals is None or _by_reference is None:
        return None
    entry = _entries.get(fn)
    if entry is not None and entry.holds(fn, world):
        return None if entry.blob is None else (entry.loader, entry.blob)
    entry = _Entry(world)
    inputs: list[tuple[types.FunctionType, tuple[Any, ...]]] = []
    if _qualifies(fn, inputs):
        entry.blob = _dumps(fn, pickler)
        if entry.blob is not None and not any(_writes(owner) for owner, _ in inputs):
            entry.loader = load_shared
    if entry.blob is None:
        entry.ids = tuple(map(id, inputs[0][1])) if inputs and inputs[0][0] is fn else None
    else:
        entry.inputs = [(None if owner is fn else owner, now) for owner, now in inputs]
    if entry.blob is None and entry.ids is None:
        return None  # nothing to check it by next time (it cannot be told apart): ask again then
    with _lock:
        if len(_entries) >= MAX_KEPT:  # functions made in a loop (lambdas): never an unbounded cache
            _entries.clear()
        _entries[fn] = entry
    return None if entry.blob is None else (entry.loader, entry.blob)


def load(blob: bytes) -> types.FunctionType:
    """The function a :func:`pickled` pickle holds (unpickled here, on the worker, a fresh copy each call)."""
    fn = pickle.loads(blob)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"expected a pickled function, got {type(fn).__name__}")
    return fn


_shared: dict[bytes, types.FunctionType] = {}


def load_shared(blob: bytes) -> types.FunctionType:
    """The function a :func:`pickled` pickle holds, unpickled once per process and reused.

    Only for a function that cannot change anything of its own (see the module docstring), so
    that every call sees the very function a fresh copy would be.
    """
    fn = _shared.get(blob)
    if fn is None:
        fn = load(blob)
        with _lock:
            if len(_shared) >= MAX_SHARED:
                _shared.clear()
            _shared[blob] = fn
    return fn


def world() -> tuple[Any, ...]:
    """What every answer kept here rests on: cloudpickle's by-value registry, and how many modules are loaded.

    The registry decides what goes by value; the modules loaded, which submodules go along.
    """
    return (cloudpickle.list_registry_pickle_by_value(), len(sys.modules))


def _inputs(fn: types.FunctionType) -> tuple[Any, ...] | None:
    """Everything cloudpickle reads off ``fn`` to pickle it, in a fixed order (None: cannot tell)."""
    assert _code_globals is not None
    code = fn.__code__
    try:
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    except ValueError:  # an empty cell
        return None
    names = _code_globals(code)  # fixed by the code object (cloudpickle caches it per code object)
    space = fn.__globals__
    annotations = fn.__annotations__
    kwdefaults = fn.__kwdefaults__ or {}
    return (
        code,
        fn.__defaults__,
        fn.__name__,
        fn.__qualname__,
        fn.__module__,
        fn.__doc__,
        len(fn.__dict__),
        *cells,
        *[space.get(name, _MISSING) for name in names],
        *[space.get(name, _MISSING) for name in _BASE_GLOBALS],
        *[x for item in annotations.items() for x in item],
        *[x for item in kwdefaults.items() for x in item],
    )


def _qualifies(fn: types.FunctionType, inputs: list[tuple[types.FunctionType, tuple[Any, ...]]]) -> bool:
    """True when ``fn`` goes by value and all it reads is immutable; its inputs (and its helpers') go to ``inputs``."""
    assert _by_reference is not None
    if any(f is fn for f, _ in inputs):  # met already (a recursive helper)
        return True
    if fn.__dict__ or _by_reference(fn):  # attributes of its own (mutable), or a name the worker imports
        return False
    now = _inputs(fn)
    if now is None:
        return False
    inputs.append((fn, now))
    space = fn.__globals__
    values = [c.cell_contents for c in fn.__closure__ or ()]
    values += [space[name] for name in _code_globals(fn.__code__) if name in space]  # type: ignore[misc]
    values += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    values += list(fn.__annotations__.values())
    return all(_fixed(value, inputs) for value in values)


def _fixed(value: Any, inputs: list[tuple[types.FunctionType, tuple[Any, ...]]], depth: int = 0) -> bool:
    """True when ``value`` pickles the same for as long as it is the same object."""
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value) <= MAX_CONSTANT
    if kind in _SCALARS:
        return True
    if kind is tuple or kind is frozenset:
        return depth < 4 and len(value) <= 64 and all(_fixed(v, inputs, depth + 1) for v in value)
    if kind is types.FunctionType:
        return bool(_by_reference(value)) or _qualifies(value, inputs)  # type: ignore[misc]
    if isinstance(value, types.BuiltinFunctionType):  # len, math.sqrt: by name; a bound method is not
        return value.__self__ is None or isinstance(value.__self__, types.ModuleType)
    if isinstance(value, (types.ModuleType, type)):
        return bool(_by_reference(value))  # type: ignore[misc]
    return False


# What lets a function change something of its own, which a copy shared between calls would keep:
# assigning or deleting a global or an attribute (of itself, of a helper: attributes are not
# told apart), and names of ways around the bytecode (as names or as strings, for getattr).
_WRITES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_ATTR", "DELETE_ATTR"})
_CELL_WRITES = frozenset({"STORE_DEREF", "DELETE_DEREF"})
_REFLECTIVE = frozenset(
    {
        "globals",
        "vars",
        "locals",
        "eval",
        "exec",
        "compile",
        "setattr",
        "delattr",
        "__globals__",
        "__dict__",
        "__closure__",
        "__code__",
        "__defaults__",
        "__kwdefaults__",
        "__annotations__",
        "__builtins__",
        "_getframe",
        "currentframe",
        "f_globals",
        "f_locals",
        "f_back",
        "tb_frame",
        "gi_frame",
        "cr_frame",
        "stack",
        "cell_contents",
    }
)


def _writes(fn: types.FunctionType) -> bool:
    """True unless no code of ``fn`` (its nested code included) can change its globals, attributes or closure."""
    free = set(fn.__code__.co_freevars)
    pending = [fn.__code__]
    while pending:
        code = pending.pop()
        if _REFLECTIVE.intersection(code.co_names) or any(type(c) is str and c in _REFLECTIVE for c in code.co_consts):
            return True
        for ins in dis.get_instructions(code):
            if ins.opname in _WRITES or (ins.opname in _CELL_WRITES and ins.argval in free):
                return True
        pending.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def _dumps(fn: types.FunctionType, pickler: type[pickle.Pickler]) -> bytes | None:
    out = io.BytesIO()
    pickler(out, protocol=5).dump(fn)
    blob = out.getvalue()
    return blob if len(blob) <= MAX_PICKLE else None
