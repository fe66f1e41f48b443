"""Offsets past 2^31 elements: the Triton kernels compute a sample's base in int64 and its inner offsets in int32.

Inputs are views of one 7 GiB fp16 storage of untouched virtual memory (only the few pages the views cover are
written). Three samples lie 2^30 + 16 elements apart from offset 2^31, so sample 2 starts past 2^32: an int32
``n * stride`` wraps to offset 32, which holds a sentinel, and a kernel that wrapped returns values made of it.
Inputs whose one sample spans 2^31 elements or more must raise before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch

import ktkernels
from ktkernels import backend
from ktkernels.blurpool import geometry
from ktkernels.dct import op as dct_op
from ktkernels.dct.reference import transform_reference
from ktkernels.losses import op as loss_op
from ktkernels.losses import reference as loss_ref

SAMPLE_STRIDE = 2**30 + 16
START = 2**31
WRAPPED = START + 2 * SAMPLE_STRIDE - 2**32  # where sample 2 lands if n * stride wraps in int32
SENTINEL = 1000.0

pytestmark = pytest.mark.skipif(not backend.triton_interpreter(), reason="the Triton kernels on CPU tensors")


@pytest.fixture(scope="module")
def storage():
    store = torch.empty(START + 3 * SAMPLE_STRIDE, dtype=torch.float16)
    store[WRAPPED - 64 : WRAPPED + 1024].fill_(SENTINEL)
    return store


def spread(storage: torch.Tensor, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """A (3, *shape) contiguous-per-sample view whose samples are SAMPLE_STRIDE apart, filled with fresh values."""
    strides = torch.empty(shape).stride()
    view = storage.as_strided((3, *shape), (SAMPLE_STRIDE, *strides), START + offset)
    view.copy_(torch.randn(view.shape).to(view.dtype))
    return view


def compact(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().contiguous()


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-3, atol=2e-3)


def test_dct_and_power_mean_read_and_write_past_2_31(storage):
    x = spread(storage, (2, 4, 5))
    with ktkernels.use_backend("triton"):
        y = dct_op.dct_transform(x, "dct", "ortho", [4, 5], False)
        power = dct_op.channel_power_mean(x, 2.0)
        grad = dct_op.channel_power_mean_backward(x, torch.ones(3, 4, 5), 2.0)
    close(y, transform_reference(compact(x), "dct", "ortho", [4, 5], False))
    close(power, compact(x).square().mean(1))
    close(grad, compact(x))  # (p / C) x with p = C = 2


def test_transfer_terms_and_gradient_read_past_2_31(storage):
    s, t = spread(storage, (2, 4, 4)), spread(storage, (2, 4, 4), offset=64)
    with ktkernels.use_backend("triton"):
        terms, proj = loss_op.pixel_global_terms(s, t, "dct_lowpass", 2)
        coef = torch.randn_like(proj[0])
        grad = loss_op.transfer_grad(s, t, torch.ones(1), coef, "dct_lowpass", 2)
    with ktkernels.use_backend("torch"):
        ref_terms, ref_proj = loss_op.pixel_global_terms(compact(s), compact(t), "dct_lowpass", 2)
        ref_grad = loss_op.transfer_grad(
            compact(s), compact(t), torch.ones(1).double(), coef.double(), "dct_lowpass", 2
        )
    close(terms, ref_terms)
    close(proj, ref_proj)
    close(grad, ref_grad)


def test_soft_targets_read_past_2_31(storage):
    s, t = spread(storage, (16,)), spread(storage, (16,), offset=64)
    with ktkernels.use_backend("triton"):
        kl, lse = loss_op.soft_target_kl(s, t, 2.0)
        grad_s, grad_t = loss_op.soft_target_kl_backward(s, t, 2.0, kl, lse, torch.ones(3), True, True)
    rows = loss_ref.soft_target_stats(compact(s), compact(t), 2.0)
    ref_s, ref_t = loss_ref.soft_target_grads(compact(s), compact(t), 2.0, rows, torch.ones(3).double())
    close(kl, rows[:, 0])
    close(lse, rows[:, 1:])
    close(grad_s, ref_s)
    close(grad_t, ref_t)


def test_a_sample_past_the_32_bit_offsets_is_refused(storage, monkeypatch):
    """One sample spanning 2^31 elements (a channel stride of 2^31): each family raises before its kernel. Every
    Triton kernel is replaced by one that fails when launched: a missing check must fail here, not interpret a
    row of 2^31 classes."""
    import importlib

    from triton.runtime import JITFunction
    from triton.runtime.interpreter import InterpretedFunction

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("a Triton kernel was launched: the span check is missing")

    replaced = False
    for module in ("ktkernels.blurpool.triton", "ktkernels.dct.triton", "ktkernels.losses.triton"):
        kernels = importlib.import_module(module)
        for attr, value in list(vars(kernels).items()):
            if isinstance(value, (JITFunction, InterpretedFunction)):
                monkeypatch.setattr(kernels, attr, NotLaunched())
            replaced = True
    assert replaced
    x = storage.as_strided((1, 2, 2, 2), (0, 2**31, 2, 1))
    logits = storage.as_strided((1, 2**31 + 1), (0, 1))  # one row of 2^31 + 1 classes
    rows, one = torch.zeros(1), torch.ones(1)
    with ktkernels.use_backend("triton"):
        for call in (
            lambda: dct_op.dct_transform(x, "dct", "ortho", [2, 2], False),
            lambda: dct_op.channel_power_mean(x, 2.0),
            lambda: dct_op.channel_power_mean_backward(x, torch.ones(1, 2, 2), 2.0),
            lambda: loss_op.pixel_global_terms(x, x, "none", 1),
            lambda: loss_op.transfer_grad(x, x, one, torch.zeros(1, 2, 1), "gap", 1),
            lambda: ktkernels.blur_pool2d(x, filt_size=1, stride=1, padding=0),
        ):
            with pytest.raises(ValueError, match=r"spans 2147483652 elements.*32-bit offsets reach"):
                call()
        for call in (
            lambda: loss_op.soft_target_kl(logits, logits, 2.0),
            lambda: loss_op.soft_target_kl_backward(logits, logits, 2.0, rows, torch.zeros(1, 2), one, True, True),
        ):
            with pytest.raises(ValueError, match=r"spans 2147483649 elements.*32-bit offsets reach"):
                call()


def test_blur_tables_past_32_bits_are_refused(monkeypatch):
    """The blur-pool tables index in int32 (every backend) and the Triton kernels offset into them in int32: an
    axis that would pass either limit raises instead of wrapping. A table that large would take gigabytes, so
    the Triton check is fed a stand-in of 2^31 elements (an expanded scalar)."""
    with pytest.raises(ValueError, match=r"axis of 2147483648 positions \(1073741824 outputs\).*backend 'torch'"):
        geometry.forward_table(geometry.Axis(2**31, 2, 2, 0, 0, "zero"))
    from ktkernels.blurpool import triton as kernels

    axis = geometry.Axis(8, 3, 2, 1, 1, "reflect")
    monkeypatch.setattr(kernels, "device_table", lambda *args: (0, torch.zeros(1).expand(2**31)))
    with pytest.raises(ValueError, match=r"window table holds 2147483648 elements.*32-bit offsets"):
        kernels._table("window", axis, torch.device("cpu"))
    monkeypatch.setattr(kernels, "device_table", lambda *args: (0, torch.zeros(1).expand(2**31 - 1)))
    assert kernels._table("window", axis, torch.device("cpu"))[1].numel() == 2**31 - 1


def test_power_mean_grids_keep_the_batch_off_the_short_grid_axes(monkeypatch):
    """CUDA grid axes 1 and 2 stop at 65535: a batch of 70000 maps (a vmapped batch folds into N) must ride on
    axis 0 of the Triton power-mean launches, or the launch fails on a GPU (the interpreter has no such limit)."""
    from ktkernels.dct import triton as kernels

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "_power_mean_kernel", Recorder())
    monkeypatch.setattr(kernels, "_power_mean_backward_kernel", Recorder())
    x = torch.zeros(1, 3, 2, 2).expand(70000, 3, 2, 2)
    kernels.power_mean(x, 2.0, torch.empty(70000, 2, 2))
    kernels.power_mean_backward(x, torch.empty(70000, 2, 2), 2.0, torch.empty(70000, 3, 2, 2))
    assert len(grids) == 2 and all(max(grid[1:], default=1) <= 65535 for grid in grids), grids
    assert all(grid[0] >= 70000 for grid in grids), grids
