"""Write docs/api.md from the docstrings of rtq's public names, so the reference never drifts.

Run ``python docs/gen_api.py`` after changing a public signature or docstring; the test suite
runs it with ``--check`` and fails when docs/api.md is stale.
"""

from __future__ import annotations

import enum
import inspect
import sys
from pathlib import Path

import rtq
import rtq.errors

OUT = Path(__file__).with_name("api.md")

# (title, object, methods to document) in reading order.
SECTIONS: list[tuple[str, str, list[str]]] = [
    ("rtq.connect", "connect", []),
    ("rtq.RedisTaskQueue", "RedisTaskQueue", [
        "query", "execute_task_remotely", "execute_task_locally", "submit", "wait", "cancel",
        "listen", "set_queue_listened", "is_listened", "build_task", "set_task", "get_task", "has_task",
    ]),
    ("rtq.RedisTask", "RedisTask", ["update", "save"]),
    ("rtq.TaskExecutePolicy", "TaskExecutePolicy", []),
    ("rtq.Executor", "Executor", ["submit", "map", "actor", "shutdown"]),
    ("rtq.Actor", "Actor", ["close"]),
    ("rtq.TaskFuture", "TaskFuture", ["progress", "cancel", "stop"]),
    ("rtq.current_task", "current_task", []),
    ("rtq.tqdm", "tqdm", []),
    ("rtq.progress", "progress", []),
    ("rtq.local_worker", "local_worker", []),
    ("rtq.dashboard", "dashboard", []),
]


def _signature(obj: object, name: str) -> str:
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    parts: list[str] = []
    star_done = False
    for p in sig.parameters.values():
        if p.name.startswith("_") or p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        star_done = star_done or p.kind is p.VAR_POSITIONAL
        text = prefix + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            d = p.default
            default = f"{type(d).__name__}.{d.name}" if isinstance(d, enum.Enum) else repr(d)
            text += f" = {default}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and not any(
            q.kind is q.POSITIONAL_ONLY for q in list(sig.parameters.values())[list(sig.parameters).index(p.name) + 1 :]
        ):
            parts.append("/")
    return f"{name}({', '.join(parts)})"


_SECTIONS = ("Args:", "Arguments:", "Returns:", "Raises:", "Attributes:", "Yields:")


def _doc(obj: object) -> str:
    """The docstring as Markdown: Google-style sections become bulleted lists."""
    text = inspect.cleandoc(inspect.getdoc(obj) or "(undocumented)")
    out: list[str] = []
    in_section = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in _SECTIONS:
            out += ["", f"**{stripped[:-1]}**", ""]
            in_section = True
        elif in_section and line.startswith("    ") and not line.startswith("        "):
            name, sep, rest = stripped.partition(": ")
            out.append(f"- `{name}`: {rest}" if sep and " " not in name.strip("*") else f"- {stripped}")
        elif in_section and line.startswith("        "):
            out[-1] += " " + stripped
        else:
            in_section = in_section and bool(stripped) and line.startswith(" ")
            out.append(line)
    return "\n".join(out).replace("``", "`")


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.",
        "",
    ]
    for title, attr, methods in SECTIONS:
        if attr not in rtq.__all__:
            continue
        obj = getattr(rtq, attr)
        lines += [f"## `{title}`", "", "```python", _signature(obj, attr), "```", "", _doc(obj), ""]
        for method in methods:
            member = inspect.getattr_static(obj, method)
            if isinstance(member, property):
                lines += [f"### `{attr}.{method}` (property)", "", _doc(member), ""]
                continue
            func = getattr(obj, method)
            lines += [f"### `{attr}.{method}`", "", "```python", _signature(func, method), "```", "", _doc(func), ""]
    lines += ["## `rtq.errors`", "", _doc(rtq.errors), ""]
    for name in rtq.errors.__all__:
        cls = getattr(rtq.errors, name)
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        lines += [f"- **`{name}`** ({bases}): {_doc(cls).splitlines()[0]}"]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
