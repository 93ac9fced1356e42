"""Values pulled from a session come home usable: CUDA tensors travel on the CPU to a notebook without CUDA.

Runs with torch installed (a CPU build is enough: ``pip install rtq[torch-tests]``) and is
skipped without it. A CPU build cannot make CUDA tensors, so the decision is checked in its
parts: the notebook's side says it has no CUDA, the worker's side moves exactly the tensors that
live off the CPU (a stand-in device says where), and a model pulled through a real session and
kernel arrives whole, its parameters still parameters.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Iterator

import pytest

from conftest import Workers
from rtq.notebook.cells import ShippedValues
from rtq.notebook.devices import cpu_dispatch, needs_moving, notebook_has_cuda
from test_magic import Kernel, _client, _kernel_env, errors, traceback_text

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(180)


def test_the_notebook_side_decides_to_move_when_it_has_no_cuda() -> None:
    assert torch.cuda.is_available() is False  # a CPU build
    assert notebook_has_cuda() is False  # so pulled tensors must come on the CPU


def test_the_worker_side_moves_exactly_the_tensors_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not needs_moving(torch.zeros(2))
    assert needs_moving(types.SimpleNamespace(device=torch.device("cuda", 0)))
    assert not needs_moving(torch.empty(2, device="meta"))  # no data to move: pickled as it is
    moved: list[object] = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: object, *args: object, **kwargs: object) -> object:
        moved.append(self)
        return real_cpu(self, *args, **kwargs)

    # Stand in for CUDA: every tensor reports a CUDA device, and .cpu() is watched.
    monkeypatch.setattr("rtq.notebook.devices.needs_moving", lambda t: True)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    model = torch.nn.Linear(3, 2)
    values = ShippedValues(cpu=True)
    values.add("model", model)
    assert len(moved) == 2  # weight and bias: each parameter's data went through .cpu()
    back = pickle.loads(pickle.dumps(values, protocol=5))["model"]
    assert isinstance(back.weight, torch.nn.Parameter) and back.weight.requires_grad
    assert torch.equal(back.weight, model.weight) and torch.equal(back.bias, model.bias)
    assert cpu_dispatch()  # with torch imported, the mover is in place


@pytest.fixture
def kernel(workers: Workers, redis_url: str) -> Iterator[Kernel]:
    workers.start("cells", task_fn=None, prefix="rtq")
    client = _client()
    with client.setup_kernel(env=_kernel_env()):
        k = Kernel(client)
        k.run("%load_ext rtq")
        k.connect(redis_url)
        yield k


def test_a_model_pulled_from_a_session_arrives_whole(kernel: Kernel) -> None:
    cell = kernel.run(
        "%%rtq cells --session train\nimport torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(4, 1)\n"
        "for _ in range(3):\n    model.weight.data += 1\nchecksum = float(model.weight.sum())"
    )
    assert not errors(cell), traceback_text(cell)
    cell = kernel.run("%rtq pull train model checksum")
    assert not errors(cell), traceback_text(cell)
    shown = kernel.value(
        "import torch\n(type(model.weight).__name__, model.weight.device.type, "
        "abs(float(model.weight.sum()) - checksum) < 1e-6)"
    )
    assert shown == "('Parameter', 'cpu', True)"
    kernel.run("%rtq session close train")
