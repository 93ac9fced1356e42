"""The cloudpickle extension that ships notebook code: what goes by value, and version checks.

cloudpickle already ships functions, lambdas and classes defined in ``__main__`` (a notebook) by
value. It ships everything else *by reference* — a module name the worker must import — which
fails for a ``helpers.py`` sitting next to the notebook. Before each shipment rtq registers
every imported module that is not installed (not in the standard library, site-packages or an
installed distribution) with ``cloudpickle.register_pickle_by_value``, so such local code
travels with the call while installed packages still go by reference.

Pickles are only readable by the same Python major.minor and cloudpickle version, so a client
checks the versions the workers of a queue announce before shipping code to them.
"""

from __future__ import annotations

import importlib.metadata
import os
import site
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import cloudpickle

from .errors import VersionMismatch

if TYPE_CHECKING:
    from .task_queue import RedisTaskQueue

__all__ = ["check_worker_versions", "runtime_versions", "ship_local_modules"]

_lock = threading.Lock()
_seen_modules = 0
_by_value: set[str] = set()


def _installed_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(site.getusersitepackages())
    paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix})
    return tuple(str(Path(p).resolve()) + os.sep for p in paths if p)


_ROOTS = _installed_roots()


def _is_local(name: str, module: ModuleType, distributions: Mapping[str, list[str]]) -> bool:
    if name in ("__main__", "__mp_main__") or name.startswith(("rtq", "_")) or "." in name:
        return False
    if name in distributions or name in sys.stdlib_module_names:
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    try:
        resolved = str(Path(file).resolve())
    except OSError:
        return False
    return not resolved.startswith(_ROOTS)


def ship_local_modules() -> frozenset[str]:
    """Register every imported local (not installed) top-level module to pickle by value.

    Cheap when nothing new was imported since the last call. Returns the registered names.
    """
    global _seen_modules
    with _lock:
        if len(sys.modules) != _seen_modules:
            distributions = importlib.metadata.packages_distributions()
            for name, module in list(sys.modules.items()):
                if name in _by_value or module is None:
                    continue
                if _is_local(name, module, distributions):
                    cloudpickle.register_pickle_by_value(module)
                    _by_value.add(name)
            _seen_modules = len(sys.modules)
        return frozenset(_by_value)


def runtime_versions() -> dict[str, str]:
    """The versions a pickle depends on, as workers announce them."""
    from . import __version__

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "python_full": sys.version.split()[0],
        "cloudpickle": cloudpickle.__version__,
        "rtq": __version__,
    }


_checked: dict[tuple[int, str], float] = {}
CHECK_EVERY = 30.0


def check_worker_versions(queue: RedisTaskQueue, name: str) -> None:
    """Refuse to ship code to queue ``name`` when a live worker of it runs other versions.

    Raises:
        VersionMismatch: naming the worker and the differing Python or cloudpickle version.
    """
    cache_key = (id(queue), name)
    if time.monotonic() - _checked.get(cache_key, -CHECK_EVERY) < CHECK_EVERY:
        return
    mine = runtime_versions()
    problems = []
    for info in queue.live_workers():
        if name not in info.get("queues", []):
            continue
        for what in ("python", "cloudpickle"):
            theirs = info.get(what)
            if theirs and theirs != mine[what]:
                problems.append(f"worker {info.get('id')} runs {what} {theirs}, this client {mine[what]}")
    if problems:
        raise VersionMismatch(
            f"cannot ship code to queue {name!r}: pickles only load on the same Python major.minor "
            "and cloudpickle version; " + "; ".join(problems)
        )
    _checked[cache_key] = time.monotonic()
