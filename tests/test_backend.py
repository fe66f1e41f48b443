"""ktkernels.backend: Triton launches run on their tensors' CUDA device (backend.triton_device) in every op family,
and the choice itself (names, restoring, what a named backend that cannot run does)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ktkernels
from ktkernels import backend
from ktkernels.blurpool import reference as blur_ref

PACKAGE = Path(ktkernels.__file__).resolve().parent
OP_MODULES = sorted(PACKAGE.glob("*/op.py"))


def test_triton_device_is_the_tensors_device():
    with FakeTensorMode():  # a cuda:1 tensor without a GPU
        on_second = torch.empty(2, device="cuda:1")
    context = backend.triton_device(on_second)
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(backend.triton_device(torch.empty(2)), contextlib.nullcontext)


def _triton_launches(tree: ast.AST) -> list[tuple[ast.Call, list[ast.With]]]:
    """Every call ``kernels.f(...)`` or ``_kernels().f(...)``, with the ``with`` blocks around it."""
    found = []

    def visit(node: ast.AST, withs: list[ast.With]) -> None:
        if isinstance(node, ast.With):
            withs = [*withs, node]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == "kernels") or (
                isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "_kernels"
            ):
                found.append((node, withs))
        for child in ast.iter_child_nodes(node):
            visit(child, withs)

    visit(tree, [])
    return found


def _enters_triton_device(block: ast.With) -> bool:
    return any(
        isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func) == "backend.triton_device"
        for item in block.items
    )


def test_every_triton_launch_enters_its_tensors_device():
    """Checked in the source, as no CPU machine (nor a one-GPU one) can show the bug: each launch of a family's
    Triton module from its op.py sits in a ``with backend.triton_device(...)`` block."""
    launches = {path.parent.name: _triton_launches(ast.parse(path.read_text())) for path in OP_MODULES}
    assert {family for family, calls in launches.items() if calls} == {"blurpool", "dct", "losses"}
    unguarded = [
        f"{family}/op.py:{call.lineno} {ast.unparse(call.func)}"
        for family, calls in launches.items()
        for call, withs in calls
        if not any(_enters_triton_device(block) for block in withs)
    ]
    assert not unguarded, unguarded


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_runs_on_the_inputs_gpu_when_another_is_current():
    x = torch.randn(2, 8, 15, 14, dtype=torch.float64).to(dtype=torch.float32)
    expected = blur_ref.blur_pool2d_reference(x.double(), 4, 2, (1, 2, 1, 2), "reflect")
    with torch.cuda.device(0), ktkernels.use_backend("triton"):
        x1 = x.to("cuda:1").requires_grad_()
        y = ktkernels.blur_pool2d(x1)
        (gx,) = torch.autograd.grad(y, x1, torch.ones_like(y))
        m = ktkernels.max_blur_pool2d(x1)
    assert y.device == gx.device == m.device == torch.device("cuda:1")
    torch.testing.assert_close(y.double().cpu(), expected, atol=2e-6, rtol=0)
    assert torch.isfinite(gx).all() and torch.isfinite(m).all()


# ----------------------------------------------------------------------------------------------
# The choice itself (backend.py), without running kernels


def test_names_are_case_insensitive_and_restored_after_an_exception():
    before = backend.get_backend()
    with ktkernels.use_backend("TORCH"):  # as KTK_BACKEND=Torch would be read
        assert backend.get_backend() == "torch"
    with pytest.raises(KeyError), ktkernels.use_backend("torch"):
        raise KeyError("inside the block")
    assert backend.get_backend() == before


def test_named_triton_needs_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ktkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve("blurpool", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ktkernels.use_backend("triton"):
        assert backend.resolve("blurpool", torch.device("cpu")) == "triton"


def test_an_extension_without_a_family_raises_when_named_and_warns_under_auto(monkeypatch):
    # An extension built from an older checkout may lack a newer family's kernels.
    monkeypatch.setattr(backend, "has_compiled_kernels", lambda device_type, family="blurpool": False)
    backend._warn_once.cache_clear()
    with ktkernels.use_backend("cpu"), pytest.raises(RuntimeError, match="built without CPU losses kernels"):
        backend.resolve("losses", torch.device("cpu"))
    with ktkernels.use_backend("auto"), pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        assert backend.resolve("losses", torch.device("cpu")) == "torch"
    backend._warn_once.cache_clear()
