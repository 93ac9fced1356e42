"""The Lua scripts rtq runs in Redis, one file per atomic step.

Each file's header lists its KEYS and ARGV with their Redis types. Scripts are registered once
per client with ``register_script``, which reloads them transparently after a NOSCRIPT error
(a Redis restart or ``SCRIPT FLUSH``).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

NAMES = (
    "claim",
    "finish",
    "progress",
    "cancel",
    "recover",
    "heartbeat",
    "output",
    "submit",
    "consume",
    "touch",
    "enqueue",
)


def load(client: Any) -> dict[str, Any]:
    """Register every script with ``client``; returns ``{name: Script}``."""
    here = files(__name__)
    return {name: client.register_script(here.joinpath(f"{name}.lua").read_text()) for name in NAMES}
