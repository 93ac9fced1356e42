"""Which device a value travels on: CUDA tensors go back to a notebook without CUDA on the CPU.

A model trained in a session holds CUDA tensors; unpickled in a notebook without CUDA they fail
with "Attempting to deserialize object on a CUDA device". The notebook says whether it has CUDA
(:func:`notebook_has_cuda`, on the client), and the worker pickles what goes back with
:func:`cpu_dispatch`, which moves each tensor's copy to the CPU. Neither imports torch: a
process that never imported it holds no tensors, and a notebook that never imported it uses none
on a GPU.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

__all__ = ["cpu_dispatch", "needs_moving", "notebook_has_cuda"]


def notebook_has_cuda() -> bool:
    """Whether this process (the notebook) can hold CUDA tensors: torch imported and CUDA available."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install counts as none
        return False


def cpu_dispatch() -> dict[type, Any]:
    """Pickling that moves CUDA tensors to the CPU: ``{torch.Tensor: reducer}``, or {} without torch.

    For values going back to a notebook without CUDA, which could not load them otherwise
    ("Attempting to deserialize object on a CUDA device"). The value itself stays where it is —
    a session's model keeps its weights on the GPU; only the copy that travels is on the CPU. An
    ``nn.Parameter`` pickles as its ``.data``, a plain tensor, so parameters move too.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # no tensors can exist in a process that never imported torch
        return {}
    return {torch.Tensor: _tensor_on_cpu}


def _tensor_on_cpu(tensor: Any) -> Any:
    if needs_moving(tensor):
        tensor = tensor.detach().cpu().requires_grad_(tensor.requires_grad)
    return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def needs_moving(tensor: Any) -> bool:
    """Whether a tensor lives off the CPU (CUDA, or any other accelerator) and must move to travel."""
    return getattr(getattr(tensor, "device", None), "type", "cpu") not in ("cpu", "meta")
