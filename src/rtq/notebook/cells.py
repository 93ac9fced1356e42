"""What a ``%%rtq`` cell needs and makes (client side), and running it on a worker.

Two halves, one module, because they must agree on the :class:`CellSpec` / :class:`CellResult`
shapes and on how a cell's source is compiled:

* :func:`analyze` reads a cell's source (never runs it) and finds the names it reads before
  assigning them — what must be shipped — and the names it assigns — what comes back. Top-level
  statements are followed in order, so ``df = load(); df.describe()`` does not ship the
  notebook's old ``df``; nested scopes (functions, lambdas, classes, comprehensions) are read
  with :mod:`symtable`, the compiler's own scoping rules. When in doubt (a name assigned in only
  one branch of an ``if``) a name counts as read: shipping a value the cell then overwrites is
  harmless, missing one is a ``NameError`` on the worker.
* :func:`run_cell` is the function a worker runs: the cell's code in a fresh namespace holding
  the shipped values, returning the values to bring back and the last expression's value. The
  cell is compiled under the same file name the notebook registered its source under, and the
  source is put into :mod:`linecache` on the worker too, so tracebacks on both sides show the
  cell's own lines.

This module imports no IPython: workers need only rtq.
"""

from __future__ import annotations

import ast
import builtins
import collections
import importlib
import io
import pickle
import socket
import symtable
import types
from dataclasses import dataclass, field
from typing import Any

from ..frames import annotate
from ..sources import Pickler, register_source
from ..task import RedisTask
from .devices import cpu_dispatch

__all__ = [
    "CellAnalysis",
    "CellResult",
    "CellSpec",
    "RemoteDisplay",
    "ShippedValues",
    "analyze",
    "run_cell",
    "ship_back",
]


# -- reading a cell ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CellAnalysis:
    """What a cell reads from and writes to the notebook's namespace.

    Attributes:
        reads: Names read before the cell assigns them (builtins included), in order.
        assigns: Names the cell binds at its top level, in order.
        last_expr: Whether the cell ends with a bare expression (its value is displayed).
    """

    reads: tuple[str, ...]
    assigns: tuple[str, ...]
    last_expr: bool


def parse(source: str, filename: str, first_line: int = 1) -> ast.Module:
    """Parse a cell body whose first line is line ``first_line`` of the file ``filename``.

    Raises:
        SyntaxError: with the line number as the notebook shows it.
    """
    return ast.parse("\n" * (first_line - 1) + source, filename, "exec")


def analyze(source: str, filename: str = "<cell>", first_line: int = 1) -> CellAnalysis:
    """Find the names ``source`` reads from outside and the names it assigns.

    Raises:
        SyntaxError: the cell does not parse (line numbers count from ``first_line``).
    """
    tree = parse(source, filename, first_line)
    walker = _Walker()
    walker.block(tree.body, set())
    return CellAnalysis(
        reads=tuple(walker.reads),
        assigns=tuple(walker.assigns),
        last_expr=bool(tree.body) and isinstance(tree.body[-1], ast.Expr),
    )


def _scan(node: ast.AST, mode: str) -> tuple[set[str], set[str]]:
    """Global names read, and module names bound, by one statement or expression.

    Python's own symbol tables decide scoping (class bodies, closures, comprehensions).
    """
    table = symtable.symtable(ast.unparse(node), "<rtq-cell>", mode)
    reads: set[str] = set()
    binds = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    pending = [table]
    while pending:
        current = pending.pop()
        for sym in current.get_symbols():
            if sym.is_referenced() and sym.is_global():
                reads.add(sym.get_name())
            if current is not table and sym.is_assigned() and sym.is_global():
                binds.add(sym.get_name())  # `global x; x = ...` in a function, or a walrus in a comprehension
        pending.extend(current.get_children())
    return reads, binds


class _Walker:
    """Follows a cell's top-level statements in order, tracking names surely assigned so far."""

    def __init__(self) -> None:
        self.reads: dict[str, None] = {}  # ordered sets
        self.assigns: dict[str, None] = {}

    def read(self, names: set[str] | list[str], definite: set[str]) -> None:
        for name in sorted(names):
            if name not in definite:
                self.reads.setdefault(name)

    def expr(self, node: ast.expr | None, definite: set[str]) -> None:
        if node is None:
            return
        reads, binds = _scan(node, "eval")
        self.read(reads, definite)
        for name in sorted(binds):  # a walrus: maybe evaluated, so not surely assigned
            self.assigns.setdefault(name)

    def target(self, node: ast.expr, definite: set[str]) -> set[str]:
        """Names bound by an assignment target; attribute and subscript targets are reads."""
        if isinstance(node, ast.Name):
            self.assigns.setdefault(node.id)
            return {node.id}
        if isinstance(node, (ast.Tuple, ast.List)):
            return set().union(*(self.target(e, definite) for e in node.elts)) if node.elts else set()
        if isinstance(node, ast.Starred):
            return self.target(node.value, definite)
        self.expr(node, definite)  # obj.attr = ... / obj[k] = ... reads obj (and k)
        return set()

    def block(self, body: list[ast.stmt], definite: set[str]) -> set[str]:
        definite = set(definite)
        for stmt in body:
            definite = self.stmt(stmt, definite)
        return definite

    def stmt(self, node: ast.stmt, d: set[str]) -> set[str]:
        if isinstance(node, ast.Assign):
            self.expr(node.value, d)
            for t in node.targets:
                d = d | self.target(t, d)
            return d
        if isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):
                self.read([node.target.id], d)
            self.expr(node.value, d)
            return d | self.target(node.target, d)
        if isinstance(node, ast.AnnAssign):
            self.expr(node.annotation, d)
            if node.value is None:
                return d
            self.expr(node.value, d)
            return d | self.target(node.target, d)
        if isinstance(node, ast.Delete):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    self.read([t.id], d)
                    d = d - {t.id}
                else:
                    self.expr(t, d)
            return d
        if isinstance(node, ast.If):
            self.expr(node.test, d)
            return self.block(node.body, d) & self.block(node.orelse, d)
        if isinstance(node, (ast.For, ast.AsyncFor)):
            self.expr(node.iter, d)
            self.block(node.body, d | self.target(node.target, d))
            self.block(node.orelse, d)
            return d  # the loop may run zero times
        if isinstance(node, ast.While):
            self.expr(node.test, d)
            self.block(node.body, d)
            self.block(node.orelse, d)
            return d
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.expr(item.context_expr, d)
                if item.optional_vars is not None:
                    d = d | self.target(item.optional_vars, d)
            return self.block(node.body, d)
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            tried: Any = node  # ast.Try or ast.TryStar (3.11+): the same fields
            after_body = self.block(tried.body, d)
            for handler in tried.handlers:
                self.expr(handler.type, d)
                self.block(handler.body, d | ({handler.name} if handler.name else set()))
            self.block(tried.orelse, after_body)
            return self.block(tried.finalbody, d)
        if isinstance(node, getattr(ast, "Match", ())):
            self.expr(node.subject, d)  # type: ignore[attr-defined]
            for case in node.cases:  # type: ignore[attr-defined]
                bound = self._pattern(case.pattern, d)
                for name in sorted(bound):
                    self.assigns.setdefault(name)
                self.expr(case.guard, d | bound)
                self.block(case.body, d | bound)
            return d
        # Everything else (expressions, imports, def, class, raise, assert, ...) in one piece.
        reads, binds = _scan(node, "exec")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            reads.discard(node.name)  # a recursive call resolves after the def has bound the name
        self.read(reads, d)
        for name in sorted(binds):
            self.assigns.setdefault(name)
        sure = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        return d | binds if isinstance(node, sure) else d

    def _pattern(self, pattern: ast.AST, d: set[str]) -> set[str]:
        """Names a ``case`` pattern captures; the values and classes it names are reads."""
        bound: set[str] = set()
        for sub in ast.walk(pattern):
            for attr in ("name", "rest"):
                value = getattr(sub, attr, None)
                if isinstance(value, str):
                    bound.add(value)
            if type(sub).__name__ == "MatchValue":
                self.expr(sub.value, d)  # type: ignore[attr-defined]
            elif type(sub).__name__ == "MatchClass":
                self.expr(sub.cls, d)  # type: ignore[attr-defined]
        return bound


class ShippedValues(dict):  # type: ignore[type-arg]
    """Variables pickled once, as they are added: measured and checked here, shipped as those bytes.

    The magic must name a variable that cannot be pickled, and warn about big ones, before the
    cell is submitted; a worker must know which pulled variables can come back before it returns
    them. Pickling each variable for that and again to ship the cell would pay the pickling twice
    (seconds for a big object graph, a column of strings say). Here one pickler with one memo
    pickles the variables in turn, and the cell travels with those bytes (out of band, uncopied),
    so variables that share objects (a model and its optimizer) still share them at the other
    end, and an array two variables hold travels once. It unpickles as a plain ``dict``.
    """

    def __init__(self, *, cpu: bool = False) -> None:
        super().__init__()
        self._file = io.BytesIO()
        self._buffers: list[pickle.PickleBuffer] = []
        # rtq's pickler: a helper function from another cell keeps its cell's file name and lines.
        pickler = _cpu_pickler() if cpu else Pickler
        self._pickler = pickler(self._file, protocol=5, buffer_callback=self._buffers.append)

    def add(self, name: str, value: Any) -> int:
        """Pickle ``value`` as ``name``; returns the bytes it takes (its out-of-band buffers included).

        Raises:
            Exception: whatever pickling ``value`` raises; this object is then unusable (its
                stream holds part of a pickle), so start a new one.
        """
        start, first = self._file.tell(), len(self._buffers)
        self._pickler.dump(value)
        self[name] = value
        return self._file.tell() - start + sum(b.raw().nbytes for b in self._buffers[first:])

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_values, (tuple(self), pickle.PickleBuffer(self._file.getbuffer()), self._buffers)


def _cpu_pickler() -> type[Pickler]:
    """rtq's pickler, moving CUDA tensors to the CPU as it goes (when torch is loaded here)."""
    moves = cpu_dispatch()
    if not moves:
        return Pickler
    # The C pickler reads its dispatch table once, when made: it must be the class's.
    return type("CpuPickler", (Pickler,), {"dispatch_table": collections.ChainMap(moves, Pickler.dispatch_table)})


def _load_values(names: tuple[str, ...], stream: Any, buffers: list[Any]) -> dict[str, Any]:
    unpickler = pickle.Unpickler(io.BytesIO(stream), buffers=buffers)
    return {name: unpickler.load() for name in names}


VALUE_KEY = ""
"""Where a cell's last expression value travels among its :class:`ShippedValues` (no variable
has this name)."""


# -- running a cell (on the worker) ------------------------------------------------------------
@dataclass
class CellSpec:
    """A cell as shipped to a worker.

    Attributes:
        source: The cell's body (without the ``%%rtq`` line).
        text: The whole cell as the notebook shows it, registered in ``linecache`` under
            ``filename`` so traceback lines match the notebook's.
        filename: The name the notebook compiled the cell under.
        first_line: The line of ``text`` that ``source`` starts on.
        values: Variables shipped by value.
        modules: Variables that are modules: variable name -> module name to import.
        pull: Names to bring back (those present when the cell ends).
        display: Whether to return the value of a last bare expression.
        cpu: Move CUDA tensors in what comes back to the CPU (the notebook has no CUDA).
        replace: In a session: the shipped values replace the names it holds (``--push``);
            otherwise what it holds wins.
    """

    source: str
    text: str
    filename: str
    first_line: int = 2
    values: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    pull: tuple[str, ...] = ()
    display: bool = True
    cpu: bool = False
    replace: bool = False


@dataclass
class CellResult:
    """What a cell run sends back.

    Attributes:
        values: The pulled variables that could be shipped back.
        modules: Pulled variables that are modules: name -> module name.
        skipped: Pulled variables that could not come back: name -> why.
        has_value: Whether the cell ended with an expression whose value is in ``value``.
        value: That value (a :class:`RemoteDisplay` when the object itself cannot travel).
        host: The worker host that ran the cell.
        held: In a session: ``[name, type, bytes]`` of every name it holds now; else None.
    """

    values: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    has_value: bool = False
    value: Any = None
    host: str = ""
    held: list[list[Any]] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if VALUE_KEY in self.values:  # the value traveled with the variables (sharing their objects)
            self.value = self.values.pop(VALUE_KEY)


class RemoteDisplay:
    """The display of a value that could not travel back: its reprs, made on the worker.

    IPython shows it through ``_repr_mimebundle_`` exactly as it would the object itself.
    """

    def __init__(self, data: dict[str, Any], type_name: str) -> None:
        self.data = data
        self.type_name = type_name

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", f"<{self.type_name}>"))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return dict(self.data)


_REPR_METHODS = {
    "text/html": "_repr_html_",
    "text/markdown": "_repr_markdown_",
    "text/latex": "_repr_latex_",
    "image/svg+xml": "_repr_svg_",
    "image/png": "_repr_png_",
    "image/jpeg": "_repr_jpeg_",
    "application/json": "_repr_json_",
}


def _display_of(value: Any) -> RemoteDisplay:
    data: dict[str, Any] = {}
    bundle = getattr(value, "_repr_mimebundle_", None)
    if callable(bundle):
        try:
            got = bundle()
            data.update(got[0] if isinstance(got, tuple) else got or {})
        except Exception:
            pass
    for mime, method in _REPR_METHODS.items():
        fn = getattr(value, method, None)
        if mime not in data and callable(fn):
            try:
                out = fn()
            except Exception:
                continue
            if out is not None:
                data[mime] = out[0] if isinstance(out, tuple) else out
    try:
        data.setdefault("text/plain", repr(value))
    except Exception:
        data.setdefault("text/plain", f"<{type(value).__qualname__} object>")
    return RemoteDisplay(data, type(value).__qualname__)


def compile_cell(spec: CellSpec) -> tuple[types.CodeType, types.CodeType | None]:
    """The cell's statements, and its last bare expression apart (when ``spec.display``)."""
    tree = parse(spec.source, spec.filename, spec.first_line)
    last = None
    if spec.display and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
    # dont_inherit: this module's `from __future__ import annotations` must not leak into the cell.
    body = compile(tree, spec.filename, "exec", dont_inherit=True)
    return body, (compile(last, spec.filename, "eval", dont_inherit=True) if last else None)


def run_cell(spec: CellSpec, namespace: dict[str, Any] | None = None) -> CellResult:
    """Run a ``%%rtq`` cell here (on a worker) and return what the notebook gets back.

    Args:
        spec: The cell.
        namespace: Where it runs (a session's, which keeps the names it holds over the shipped
            ones); a fresh one by default.

    Raises:
        Exception: whatever the cell raised, carrying its frames from the cell on and a note
            naming this worker (:func:`rtq.frames.annotate`), so the notebook shows the
            traceback against the cell's own lines.
    """
    host = socket.gethostname()
    register_source(spec.filename, spec.text)
    fresh = namespace is None
    if namespace is None:
        namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        for var, module in spec.modules.items():
            if fresh or var not in namespace:
                namespace[var] = _import(module, var, host)
        if fresh or spec.replace:
            namespace.update(spec.values)
        else:  # what the session holds wins: the notebook's copy was sent only because it looked missing
            for var, value in spec.values.items():
                namespace.setdefault(var, value)
        body, last = compile_cell(spec)
        exec(body, namespace)
        value = eval(last, namespace) if last is not None else None
    except BaseException as exc:
        annotate(exc, "the %%rtq cell", caller_frames=False)  # the caller's frames are the magic's
        raise
    result = CellResult(host=host, has_value=last is not None and value is not None)
    pulled: list[tuple[str, Any]] = [(VALUE_KEY, value)] if result.has_value else []
    for name in spec.pull:
        if name not in namespace:
            continue
        obj = namespace[name]
        if isinstance(obj, RedisTask):  # `task = rtq.current_task()`: means nothing in the notebook
            continue
        if isinstance(obj, types.ModuleType):
            result.modules[name] = obj.__name__
            continue
        pulled.append((name, obj))
    result.values, problems = ship_back(pulled, cpu=spec.cpu)
    if result.has_value and VALUE_KEY in problems:
        result.value = _display_of(value)
    result.skipped = {name: why for name, why in problems.items() if name != VALUE_KEY}
    return result


def ship_back(pulled: list[tuple[str, Any]], *, cpu: bool = False) -> tuple[ShippedValues, dict[str, str]]:
    """The values that can go back, pickled once; and why each of the others cannot."""
    problems: dict[str, str] = {}
    while True:  # a failed pickle spoils the stream: start over without that value
        shipped = ShippedValues(cpu=cpu)
        for name, obj in pulled:
            if name in problems:
                continue
            try:
                shipped.add(name, obj)
            except Exception as exc:
                problems[name] = (
                    f"{type(obj).__module__}.{type(obj).__qualname__} cannot be pickled ({type(exc).__name__}: {exc})"
                )
                break
        else:
            return shipped, problems


def _import(module: str, var: str, host: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        shown = module if var == module else f"{module} (as {var})"
        raise ModuleNotFoundError(
            f"the cell uses module {shown}, which cannot be imported on worker {host}: {exc}", name=module
        ) from None
