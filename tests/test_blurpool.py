"""BlurPool family: every backend against the float64 reference, autograd, opcheck, compile, errors."""

from __future__ import annotations

import itertools
import os
import random
import re

import pytest
import torch
from backend_targets import DEVICES, INTERPRET, TARGETS
from torch import Tensor

import ktkernels
from ktkernels import backend
from ktkernels.blurpool import geometry, op
from ktkernels.blurpool import reference as ref

KERNEL_TARGETS = [t for t in TARGETS if t.values[0][0] != "torch"]
TRITON_TARGETS = [t for t in TARGETS if t.values[0][0] == "triton"]

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the reference's scale; NaN anywhere (e.g. an unwritten, poisoned element) fails."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "output has NaN (unwritten elements?)"
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3e} > {TOL[dtype] * scale:.3e} ({dtype})"


def assert_same_infs(pairs, dtype: torch.dtype) -> None:
    """Each (got, want): no NaN, +inf at exactly the reference's positions, the finite values close."""
    for got, want in pairs:
        got = got.detach().double().cpu()
        assert not got.isnan().any() and not want.isnan().any()
        assert torch.equal(got.isinf(), want.isinf()), "inf reached other outputs than the reference's"
        assert_close(got.nan_to_num(posinf=0.0), want.detach().nan_to_num(posinf=0.0), dtype)


def make_input(shape, dtype, device, layout: str) -> torch.Tensor:
    """Fresh random input in the requested memory layout: nchw | channels_last | strided."""
    if layout == "strided":
        # Slice after the dtype conversion: .to() of a non-dense view returns a contiguous copy.
        n, c, *spatial = shape
        big = torch.randn(n, c + 1, *[2 * s + 1 for s in spatial], dtype=torch.float64).to(device=device, dtype=dtype)
        x = big[(slice(None), slice(1, None), *[slice(1, None, 2) for _ in spatial])]
        assert x.stride(-1) == 2
        return x
    x = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def random_case(rng: random.Random, filt_size: int, mode: str, spatial: int = 2):
    """Sizes and pads valid for the mode: odd, rectangular, sometimes 1 pixel wide."""
    sizes, pads = [], []
    for _ in range(spatial):
        if mode == "reflect":
            before, after = (
                geometry.adobe_pads(filt_size) if rng.random() < 0.6 else (rng.randint(0, 3), rng.randint(0, 3))
            )
            size = rng.randint(max(before, after, filt_size - before - after, 0) + 1, 13)
        else:
            before, after = rng.randint(0, filt_size + 1), rng.randint(0, filt_size + 1)
            size = rng.randint(max(1, filt_size - before - after), 13)
        sizes.append(size)
        pads = [before, after] + pads  # F.pad order: last axis first
    return sizes, pads


BLUR_CASES = [(k, s, m) for k in range(1, 8) for s in range(1, 5) for m in geometry.PAD_MODES]


@pytest.mark.parametrize("filt_size", [3, 4, 5, 7])
@pytest.mark.parametrize("mode", geometry.PAD_MODES)
def test_cpu_backward_on_long_planar_rows(filt_size, mode):
    """The CPU planar backward at stride 2 runs the interior of each row as a periodic stencil of the adjoint table.
    Its two phases have different tap counts for odd filters (k3: 1 and 2, k5: 3 and 2, k7: 4 and 3), and odd
    widths add a border row with one tap more; rows of 29-41 columns make the runs long. fp64 against the
    reference, NCHW and a strided view (which keeps the planar layout)."""
    for width, layout in itertools.product((29, 30, 41), ("nchw", "strided")):
        pads = [(filt_size - 1) // 2, filt_size // 2] * 2
        x = make_input((1, 2, 9, width), torch.float64, "cpu", layout).requires_grad_()
        with ktkernels.use_backend("cpu"):
            y = op.blur_pool2d(x, filt_size, 2, pads, mode)
            grad = torch.randn_like(y)
            (got,) = torch.autograd.grad(y, x, grad)
        x64 = x.detach().clone().requires_grad_()
        ref.blur_pool2d_reference(x64, filt_size, 2, tuple(pads), mode).backward(grad)
        torch.testing.assert_close(got, x64.grad, rtol=1e-12, atol=1e-12, msg=f"width {width}, {layout}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("filt_size,stride,mode", BLUR_CASES)
def test_blur_pool2d_matches_reference(target, filt_size, stride, mode):
    """Every filt_size x stride x mode, forward and backward, with a rotating dtype and layout."""
    name, device = target
    index = BLUR_CASES.index((filt_size, stride, mode))
    if (name, device) == ("triton", "cuda") and index % 7:
        pytest.skip("Triton runs the full matrix under the interpreter; on the GPU a sample bounds JIT time")
    rng = random.Random(f"{filt_size}-{stride}-{mode}")
    sizes, pads = random_case(rng, filt_size, mode)
    dtype = DTYPES[index % 4]
    layout = ("nchw", "channels_last", "strided")[index % 3]
    x = make_input((2, 3, *sizes), dtype, device, layout).requires_grad_()
    with ktkernels.use_backend(name):
        y = op.blur_pool2d(x, filt_size, stride, pads, mode)
        grad = torch.randn_like(y)
        y.backward(grad)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(x64, filt_size, stride, tuple(pads), mode)
    expected.backward(grad.double().cpu())
    assert_close(y, expected, dtype)
    assert_close(x.grad, x64.grad, dtype)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_adobe_default_every_dtype_and_layout(target, dtype, layout):
    """The common case (k=4, s=2, reflect) on odd, rectangular maps; stride-0 (expanded) grads."""
    name, device = target
    x = make_input((3, 5, 11, 8), dtype, device, layout).requires_grad_()
    with ktkernels.use_backend(name):
        y = ktkernels.blur_pool2d(x)
        grad = torch.randn((), dtype=dtype, device=device).expand_as(y)
        y.backward(grad)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(x64, 4, 2, (1, 2, 1, 2), "reflect")
    expected.backward(grad.double().cpu())
    assert y.shape == (3, 5, 6, 4)
    assert_close(y, expected, dtype)
    assert_close(x.grad, x64.grad, dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "filt_size,stride,mode", [(3, 2, "reflect"), (4, 2, "zero"), (5, 3, "replicate"), (2, 1, "reflect")]
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_blur_pool1d_matches_reference(target, filt_size, stride, mode, layout):
    name, device = target
    rng = random.Random(filt_size * 100 + stride)
    (length,), pads = random_case(rng, filt_size, mode, spatial=1)
    dtype = torch.float64 if name != "cuda" else torch.float32
    x = make_input((2, 4, length + 6), dtype, device, layout).requires_grad_()
    with ktkernels.use_backend(name):
        y = op.blur_pool1d(x, filt_size, stride, pads, mode)
        grad = torch.randn_like(y)
        y.backward(grad)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool1d_reference(x64, filt_size, stride, tuple(pads), mode)
    expected.backward(grad.double().cpu())
    assert_close(y, expected, dtype)
    assert_close(x.grad, x64.grad, dtype)
    if layout == "channels_last":  # (N, L, C) storage in, out and for the gradient
        assert y.transpose(1, 2).is_contiguous() and x.grad.transpose(1, 2).is_contiguous()


MAX_CASES = [
    (2, 0, 4, 2, "reflect"),  # antialiased-cnns / kornia stem
    (3, 1, 4, 2, "reflect"),  # DenseNet stem
    (2, 0, 3, 2, "zero"),  # kornia k=3
    (2, 0, 5, 3, "replicate"),
    (3, 1, 2, 1, "zero"),
    (3, 0, 7, 4, "zero"),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kmax,pmax,filt_size,stride,mode", MAX_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_max_blur_pool2d_matches_reference(target, kmax, pmax, filt_size, stride, mode, layout):
    """Values, argmax codes and gradient. fp64 random data has no ties, so argmax is unambiguous."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    h, w = 13, 10
    pads = list(geometry.adobe_pads(filt_size)) * 2
    x = make_input((2, 3, h, w), dtype, device, layout).requires_grad_()
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, kmax, pmax, filt_size, stride, pads, mode)
        grad = torch.randn_like(y)
        y.backward(grad)
    exp_y, exp_codes = ref.max_blur_pool2d_reference(
        x.detach().double().cpu(), kmax, pmax, filt_size, stride, tuple(pads), mode
    )
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.cpu(), exp_codes), "argmax codes differ"
    assert_close(y, exp_y, dtype)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(
        torch.nn.functional.max_pool2d(x64, kmax, 1, pmax), filt_size, stride, tuple(pads), mode
    )
    expected.backward(grad.double().cpu())
    assert_close(x.grad, x64.grad, dtype)
    if layout == "channels_last":
        for t in (y, codes, x.grad):
            assert t.is_contiguous(memory_format=torch.channels_last)


def poison_outputs(monkeypatch) -> None:
    """Allocate every op output pre-filled with NaN (code 255), so that an element no program writes fails."""
    allocate = ktkernels.layout.alloc

    def poisoned(like, shape, channels_last, dtype=None):
        out = allocate(like, shape, channels_last, dtype)
        return out.fill_(float("nan") if out.is_floating_point() else 255)

    monkeypatch.setattr(ktkernels.layout, "alloc", poisoned)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("kmax,pmax", [(2, 0), (3, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_blur_pool2d_aligned_rows(target, kmax, pmax, layout, monkeypatch):
    """The stems on 16-byte aligned rows (W = 64), where the GPU's planar kernels load and store vectors (the
    interpreter has no vectors): values, codes and gradient against the reference, outputs pre-filled with NaN."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    x = make_input((2, 3, 10, 64), dtype, device, layout).requires_grad_()
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, kmax, pmax, 4, 2, [1, 2, 1, 2], "reflect")
        grad = torch.randn_like(y)
        y.backward(grad)
        assert torch.equal(op.max_blur_pool2d_inference(x.detach(), kmax, pmax, 4, 2, [1, 2, 1, 2], "reflect"), y)
    x64 = x.detach().double().cpu().requires_grad_()
    exp_y, exp_codes = ref.max_blur_pool2d_reference(x64.detach(), kmax, pmax, 4, 2, (1, 2, 1, 2), "reflect")
    expected = ref.blur_pool2d_reference(
        torch.nn.functional.max_pool2d(x64, kmax, 1, pmax), 4, 2, (1, 2, 1, 2), "reflect"
    )
    expected.backward(grad.double().cpu())
    assert torch.equal(codes.cpu(), exp_codes), "argmax codes differ"
    assert_close(y, exp_y, dtype)
    assert_close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("kmax,pmax,filt_size,stride,mode", MAX_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("padded", [True, False], ids=["adobe-pads", "no-pads"])
def test_max_blur_pool2d_ties_nan_and_poisoned_outputs(
    target, kmax, pmax, filt_size, stride, mode, layout, padded, monkeypatch
):
    """Ties and NaN pick torch.max_pool2d's element (first maximum, last NaN), and every output and code is written.

    Small integers make ties everywhere; the outputs are allocated pre-filled with NaN and code 255, so an
    element that no program writes fails the comparison. Without pads the last outputs also own max-map
    positions past their stride (the remainder that codes_per_owner assigns them).
    """
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    x = torch.randint(-2, 3, (2, 3, 13, 10), generator=torch.Generator().manual_seed(kmax * 10 + filt_size)).double()
    x[0, 1, 4, 5] = x[1, 2, 0, 0] = x[1, 0, 7, 3] = x[1, 0, 7, 4] = x[1, 0, 8, 3] = float("nan")
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    poison_outputs(monkeypatch)
    pads = list(geometry.adobe_pads(filt_size)) * 2 if padded else [0, 0, 0, 0]
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, kmax, pmax, filt_size, stride, pads, mode)
        if padded:  # the forward without codes: the same values, bit for bit, every element written
            y_inference = op.max_blur_pool2d_inference(x, kmax, pmax, filt_size, stride, pads, mode)
            torch.testing.assert_close(y_inference, y, rtol=0, atol=0, equal_nan=True)
    exp_y, exp_codes = ref.max_blur_pool2d_reference(x.double().cpu(), kmax, pmax, filt_size, stride, tuple(pads), mode)
    assert torch.equal(codes.cpu(), exp_codes), "argmax codes differ"
    y = y.double().cpu()
    assert torch.equal(y.isnan(), exp_y.isnan()), "NaN pattern differs (an unwritten output stays NaN)"
    assert_close(y.nan_to_num(0.0), exp_y.nan_to_num(0.0), dtype)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("kmax,pmax", [(2, 0), (3, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_blur_pool2d_backward_sums_signed_zeros_as_torch(target, kmax, pmax, layout, monkeypatch):
    """A gradient of -0 everywhere gives +0 everywhere, as torch.max_pool2d's backward (zeros, then adds) does:
    an input that is the maximum of several windows sums several -0 terms, and the sum must still start from
    +0. Random inputs make such local maxima; 41 columns give the CPU kernel's interior scan a long run."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    shape = (2, 3, 9, 41) if name != "triton" else (2, 3, 9, 10)
    x = make_input(shape, dtype, device, layout).copy_(torch.randn(shape, dtype=torch.float64)).requires_grad_()
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y = ktkernels.max_blur_pool2d(x, max_kernel=kmax, max_padding=pmax)
        y.backward(torch.full_like(y, -0.0))
    _, argmax = torch.nn.functional.max_pool2d(x.detach().cpu().contiguous(), kmax, 1, pmax, return_indices=True)
    wins = torch.stack([torch.bincount(a.flatten(), minlength=shape[2] * shape[3]) for a in argmax.flatten(0, 1)])
    assert int(wins.max()) == kmax * kmax, "no input is the maximum of all its windows: the test could not fail"
    assert torch.equal(x.grad, torch.zeros_like(x.grad)), "the gradient of a zero gradient is not zero"
    assert not torch.signbit(x.grad).any(), "a sum of -0 terms kept the sign: the sum did not start from +0"


@pytest.mark.parametrize("target", TARGETS)
def test_input_gradients_keep_the_input_layout(target):
    """The backward of every op writes its input gradient in the input's memory format (channels_last in, channels_last
    out; a (N, C, L) input whose channels are innermost likewise): no layout conversion on the way back."""
    name, device = target
    with ktkernels.use_backend(name):
        for layout in ("nchw", "channels_last"):
            for shape, fn in (
                ((2, 3, 9, 8), lambda t: ktkernels.blur_pool2d(t, filt_size=3)),
                ((2, 3, 9, 8), lambda t: ktkernels.max_blur_pool2d(t, filt_size=3)),
                ((2, 3, 9), lambda t: ktkernels.blur_pool1d(t, filt_size=3)),
            ):
                x = make_input(shape, torch.float32, device, layout).requires_grad_()
                (grad,) = torch.autograd.grad(fn(x).sum(), x)
                assert grad.stride() == x.stride(), (layout, shape, grad.stride(), x.stride())


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("codes_layout", ["channels_last", "strided", "transposed"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_blur_pool2d_backward_takes_codes_in_any_layout(target, codes_layout, layout, monkeypatch):
    """The public backward op accepts argmax codes with any strides (a user may store them), not only the ones its
    forward returns: the gradient equals the one from contiguous codes, bit for bit."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    shape, kmax, pmax = (2, 3, 9, 10), 2, 0
    x = make_input(shape, dtype, device, layout)
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, kmax, pmax, 4, 2, [1, 2, 1, 2], "reflect")
    grad = make_input(y.shape, dtype, device, layout)
    codes = codes.contiguous()
    if codes_layout == "channels_last":
        stored = codes.to(memory_format=torch.channels_last)
    elif codes_layout == "strided":
        stored = torch.zeros(*codes.shape[:3], 2 * codes.shape[3], dtype=codes.dtype, device=device)[..., ::2]
        stored.copy_(codes)
    else:
        stored = codes.transpose(2, 3).contiguous().transpose(2, 3)
    assert stored.stride() != codes.stride() and torch.equal(stored, codes)
    poison_outputs(monkeypatch)
    args = (list(shape[2:]), kmax, pmax, 4, 2, [1, 2, 1, 2], "reflect", layout == "channels_last")
    with ktkernels.use_backend(name):
        expected = op.max_blur_pool2d_backward(grad, codes, *args)
        got = op.max_blur_pool2d_backward(grad, stored, *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize(
    "shape,pads",
    [
        ((1, 2, 37, 11), [1, 2, 1, 2]),
        ((1, 2, 12, 12), [5, 5, 5, 5]),
        ((1, 2, 12, 10), [0, 0, 5, 5]),
        ((1, 53, 11, 41), [1, 2, 1, 2]),
    ],
    ids=["row-blocks", "wide-windows", "wide-rows-unpadded-columns", "long-rows"],
)
@pytest.mark.parametrize("kmax,pmax", [(2, 0), (3, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_blur_pool2d_row_blocks_and_wide_windows(target, shape, pads, kmax, pmax, layout, monkeypatch):
    """Ties, NaN, codes and gradient where the rolling kernels need several row blocks (37 rows), where the
    pads widen the windows past MAX_WINDOW (16 wide) so the banded/routing kernels take over, and where rows (41
    wide) and channel blocks (32 + 21 of 53) are longer than the CPU kernels' 16-wide max-window blocks, the last
    of which overlaps the one before; outputs poisoned."""
    name, device = target
    if name == "triton" and shape[3] == 41:
        pytest.skip("long rows exercise the CPU kernels' blocks; a new shape is a Triton compile on the GPU")
    dtype = torch.float64 if name != "cuda" else torch.float32
    x = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(kmax)).double()
    x[0, 1, 4, 5] = x[0, 0, 10, 7] = float("nan")
    x = make_input(shape, dtype, device, layout).copy_(x).requires_grad_()
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, kmax, pmax, 4, 2, pads, "reflect")
        grad = torch.randn_like(y)
        y.backward(grad)
        y_inference = op.max_blur_pool2d_inference(x.detach(), kmax, pmax, 4, 2, pads, "reflect")
    torch.testing.assert_close(y_inference, y.detach(), rtol=0, atol=0, equal_nan=True)
    x64 = x.detach().double().cpu().requires_grad_()
    exp_y, exp_codes = ref.max_blur_pool2d_reference(x64.detach(), kmax, pmax, 4, 2, tuple(pads), "reflect")
    expected = ref.blur_pool2d_reference(
        torch.nn.functional.max_pool2d(x64, kmax, 1, pmax), 4, 2, tuple(pads), "reflect"
    )
    expected.backward(grad.double().cpu())
    assert torch.equal(codes.cpu(), exp_codes), "argmax codes differ"
    assert torch.equal(y.isnan().cpu(), exp_y.isnan()), "NaN pattern differs (an unwritten output stays NaN)"
    assert_close(y.nan_to_num(0.0), exp_y.nan_to_num(0.0), dtype)
    assert_close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("kmax,pmax,filt_size,stride,mode", MAX_CASES)
@pytest.mark.parametrize("shape", [(2, 3, 13, 10), (1, 2, 9, 7)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_blur_pool2d_inf_stays_local(target, kmax, pmax, filt_size, stride, mode, shape, layout, monkeypatch):
    """+inf in the input and in the gradient reaches exactly the outputs the reference's do: the max map holds
    inf (or -inf) at window taps whose weight is zero for some output, on odd sizes, and those taps must select,
    not multiply (geometry.window_zero_taps, window_holes). Border elements are always inf; outputs poisoned."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    gen = torch.Generator().manual_seed(sum(shape) * 10 + filt_size + kmax)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    x.view(-1)[torch.randperm(x.numel(), generator=gen)[:4]] = float("inf")
    x[0, 0, -1, -1] = x[-1, -1, 0, -1] = x[0, -1, -1, 0] = float("inf")
    x = make_input(shape, dtype, device, layout).copy_(x.to(dtype)).requires_grad_()
    pads = list(geometry.adobe_pads(filt_size)) * 2
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y = op.max_blur_pool2d(x, kmax, pmax, filt_size, stride, pads, mode)[0]
        grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        grad[0, 0, 0, -1] = grad[-1, -1, -1, 0] = grad[0, 0, y.shape[2] // 2, y.shape[3] // 2] = float("inf")
        y.backward(grad.to(device=device, dtype=dtype))
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(
        torch.nn.functional.max_pool2d(x64, kmax, 1, pmax), filt_size, stride, tuple(pads), mode
    )
    expected.backward(grad)
    assert_same_infs(((y, expected), (x.grad, x64.grad)), dtype)


BLUR_EDGE_CASES = [
    # (N, C, H, W), filt_size, stride, padding (F.pad order), mode
    ((2, 3, 9, 7), 4, 2, [1, 2, 1, 2], "reflect"),  # odd W: the reflect window is one wider than the filter
    ((1, 2, 9, 150), 4, 2, [1, 2, 1, 2], "reflect"),  # several column and row tiles
    ((1, 2, 7, 151), 3, 1, [1, 1, 1, 1], "replicate"),
    ((1, 2, 10, 141), 5, 4, [0, 3, 2, 2], "zero"),
    ((2, 2, 8, 13), 7, 1, [3, 3, 3, 3], "reflect"),
    ((2, 2, 9, 10), 6, 3, [2, 3, 1, 1], "reflect"),  # stride 3: columns tap by tap (no phase split)
    ((2, 4, 12, 64), 4, 2, [1, 2, 1, 2], "reflect"),  # 16-byte aligned rows: the GPU's vector loads and stores
    ((1, 2, 8, 56), 3, 2, [1, 1, 1, 1], "reflect"),
    ((1, 2, 41, 12), 4, 2, [1, 2, 1, 2], "reflect"),  # several row blocks of the rolling kernels
    ((1, 2, 38, 9), 2, 3, [0, 1, 1, 1], "zero"),  # windows narrower than the stride (rows no output reads)
    ((1, 2, 12, 12), 4, 2, [5, 5, 5, 5], "reflect"),  # pads far from the anchors': an 18-wide window, the gather
]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("shape,filt_size,stride,padding,mode", BLUR_EDGE_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_blur_pool2d_inf_stays_local_and_every_output_is_written(
    target, shape, filt_size, stride, padding, mode, layout, monkeypatch
):
    """+inf in the input reaches exactly the outputs whose taps read it (a weight-0 window position must not
    turn it into NaN), forward and backward, on outputs pre-filled with NaN; wide rows take several tiles."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    gen = torch.Generator().manual_seed(sum(shape) * 10 + filt_size)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    x.view(-1)[torch.randperm(x.numel(), generator=gen)[:3]] = float("inf")
    x = make_input(shape, dtype, device, layout).copy_(x.to(dtype)).requires_grad_()
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y = op.blur_pool2d(x, filt_size, stride, padding, mode)
        grad = torch.randn(y.shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
        grad[0, 0, 0, -1] = float("inf")
        y.backward(grad)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(x64, filt_size, stride, tuple(padding), mode)
    expected.backward(grad.double().cpu())
    assert_same_infs(((y, expected), (x.grad, x64.grad)), dtype)


# Every input position once: the reflected window's first and last slots and its zero-weight holes.
ONE_INF_CASES = [
    ((8, 7), 4, 2, [1, 2, 1, 2], "reflect"),  # even H, odd W: rows and columns have different holes
    ((4, 4), 3, 1, [2, 2, 2, 2], "reflect"),  # pads wider than the filter's own (1, 1)
    ((5, 6), 7, 1, [3, 3, 3, 3], "reflect"),
    ((6, 5), 5, 3, [1, 3, 2, 2], "replicate"),
    ((5, 7), 6, 4, [2, 3, 3, 2], "zero"),
]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("size,filt_size,stride,padding,mode", ONE_INF_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_blur_pool2d_inf_at_every_position(target, size, filt_size, stride, padding, mode, layout, monkeypatch):
    """Channel c holds +inf at input position c (its gradient at output position c mod the output count), so one
    launch puts an inf at every position, edges and corners included: it must reach exactly the outputs whose taps
    read it, forward and backward."""
    name, device = target
    dtype = torch.float64 if name != "cuda" else torch.float32
    h, w = size
    gen = torch.Generator().manual_seed(h * 100 + w * 10 + filt_size)
    x = torch.rand((1, h * w, h, w), dtype=torch.float64, generator=gen)
    x.view(h * w, h * w)[torch.arange(h * w), torch.arange(h * w)] = float("inf")
    x = make_input(x.shape, dtype, device, layout).copy_(x.to(dtype)).requires_grad_()
    poison_outputs(monkeypatch)
    with ktkernels.use_backend(name):
        y = op.blur_pool2d(x, filt_size, stride, padding, mode)
        outputs = y.shape[2] * y.shape[3]
        grad = torch.rand(y.shape, dtype=torch.float64, generator=gen)
        grad.view(h * w, outputs)[torch.arange(h * w), torch.arange(h * w) % outputs] = float("inf")
        y.backward(grad.to(device=device, dtype=dtype))
    x64 = x.detach().double().cpu().requires_grad_()
    expected = ref.blur_pool2d_reference(x64, filt_size, stride, tuple(padding), mode)
    expected.backward(grad)
    assert_same_infs(((y, expected), (x.grad, x64.grad)), dtype)


@pytest.mark.skipif(not INTERPRET, reason="spies on the Triton launchers under the interpreter")
def test_triton_blur_takes_the_rolling_kernels(monkeypatch):
    """Every layout and stride runs the rolling kernels, forward and backward, planar (phase split) where rows
    have a unit W stride and the W stride is 1, 2 or 4; only windows wider than MAX_WINDOW gather. Results are
    checked by the tests above."""
    from ktkernels.blurpool import triton as kernels

    calls = []
    for fn in ("_rolling_forward", "_rolling_adjoint", "blur_gather"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, fn=fn, real=real: (calls.append(fn), real(*a))[1])
    planar = []  # the PLANAR flag of each rolling launch
    real_constexprs = kernels._rolling_constexprs

    def constexprs(*args, **kwargs):
        options = real_constexprs(*args, **kwargs)
        planar.append(options["PLANAR"])
        return options

    monkeypatch.setattr(kernels, "_rolling_constexprs", constexprs)

    def run(x, stride, spatial=2, pads=(1, 2)):
        calls.clear()
        with ktkernels.use_backend("triton"):
            blur = op.blur_pool2d if spatial == 2 else op.blur_pool1d
            y = blur(x.requires_grad_(), 4, stride, list(pads) * spatial, "reflect")
            y.backward(torch.randn_like(y))  # a contiguous gradient: y.sum()'s would be stride 0
        return calls[:]

    rolling = ["_rolling_forward", "_rolling_adjoint"]
    for stride in (1, 2, 3, 4):
        for x in (torch.randn(1, 2, 9, 10), torch.randn(1, 2, 10)):
            planar.clear()
            assert run(x, stride, spatial=x.dim() - 2) == rolling
            assert planar == [stride != 3] * 2
    for layout in ("channels_last", "strided"):
        planar.clear()
        assert run(make_input((1, 2, 9, 10), torch.float32, "cpu", layout), 2) == rolling
        # A strided view's gradient and grad_input are allocated planar: only its forward is not.
        assert planar == ([False, False] if layout == "channels_last" else [False, True])
    # Reflect pads far from the anchors' fold taps far into the plane: an 18-wide window.
    assert run(torch.randn(1, 2, 12, 12), 2, pads=(5, 5)) == ["blur_gather"] * 2


@pytest.mark.skipif(not INTERPRET, reason="spies on the Triton kernels under the interpreter")
def test_triton_max_blur_takes_the_rolling_kernels(monkeypatch):
    """Max-blur runs its rolling kernels in every layout and at every stride, forward and backward; only windows
    wider than MAX_WINDOW take the banded/routing ones (results: the max-blur tests above)."""
    from ktkernels.blurpool import triton as kernels

    calls = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    rolling = ["_rolling_max_blur_kernel", "_rolling_max_blur_backward_kernel"]
    banded = ["_max_blur_kernel", "_max_blur_backward_kernel"]
    for name in rolling + banded:
        monkeypatch.setattr(kernels, name, Spy(name))

    def run(x, stride, pads=(1, 2)):
        calls.clear()
        with ktkernels.use_backend("triton"):
            y = op.max_blur_pool2d(x.requires_grad_(), 2, 0, 4, stride, list(pads) * 2, "reflect")[0]
            y.backward(torch.randn_like(y))
        return calls[:]

    for stride in (1, 2, 3, 4):
        assert run(torch.randn(1, 2, 9, 10), stride) == rolling
    for layout in ("channels_last", "strided"):
        assert run(make_input((1, 2, 9, 10), torch.float32, "cpu", layout), 2) == rolling
    assert run(torch.randn(1, 2, 12, 12), 2, pads=(5, 5)) == banded  # 16-wide windows


def _spy_kernel_options(monkeypatch, name: str) -> list[dict]:
    """Record the keyword options (constexprs) of every launch of the Triton kernel ``name``; launches still run."""
    from ktkernels.blurpool import triton as kernels

    launches, kernel = [], getattr(kernels, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **options):
                launches.append(options)
                return kernel[grid](*args, **options)

            return launch

    monkeypatch.setattr(kernels, name, Spy())
    return launches


# (max_kernel, max_padding, filt_size, stride, mode, adobe pads or none, half of MAX_BLUR_TUNE's shapes). Each
# shape runs on one padded and one unpadded geometry, one with max_kernel 2 and one with 3; the odd half holds
# every PREFETCH value (the interpreter takes ~4 s per shape, so not every shape on every geometry).
THREAD_SHAPE_CASES = [
    (2, 0, 4, 2, "reflect", True, 1),
    (3, 1, 4, 2, "reflect", True, 0),
    (2, 0, 5, 3, "replicate", False, 0),
    (3, 0, 2, 1, "zero", False, 1),
]


@pytest.mark.parametrize("target", TRITON_TARGETS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kmax,pmax,filt_size,stride,mode,padded,half", THREAD_SHAPE_CASES)
def test_max_blur_forward_thread_shapes(target, layout, kmax, pmax, filt_size, stride, mode, padded, half, monkeypatch):
    """Every per-thread shape that ``bench blurpool --tune-max-blur`` may pick for the Triton kernels (T outputs
    of a row, channels, rows loaded ahead: forward and backward) gives the reference's values, codes and
    gradient, with ties, NaN and poisoned outputs: 13 output columns leave the last thread's group partly empty
    for every T, without pads the last output owns a remainder of codes, and 37 rows take several row blocks (a
    first x row inside the image). Each geometry runs one half of the shapes (``THREAD_SHAPE_CASES``). In fp32 on
    the interpreter and the GPU alike, so that the GPU run's kernels are those the precompiled cache recorded."""
    from ktkernels.bench.blurpool import MAX_BLUR_TUNE, max_blur_shape

    device = target[1]

    pads = list(geometry.adobe_pads(filt_size)) * 2 if padded else [0, 0, 0, 0]
    forward = _spy_kernel_options(monkeypatch, "_rolling_max_blur_kernel")
    backward = _spy_kernel_options(monkeypatch, "_rolling_max_blur_backward_kernel")
    poison_outputs(monkeypatch)
    size = (1, 3, 37, 27)
    rng = torch.Generator().manual_seed(sum(size) + kmax)
    x = torch.randint(-2, 3, size, generator=rng).double()  # small integers: ties, and exact fp32 forwards
    x[0, 1, 4, 5] = x[0, 0, 8, 3] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last if layout == "NHWC" else torch.contiguous_format)
    exp_y, exp_codes = ref.max_blur_pool2d_reference(x, kmax, pmax, filt_size, stride, tuple(pads), mode)
    grad = torch.randn(exp_y.shape, dtype=torch.float64, generator=rng).float().double()
    x64 = x.clone().requires_grad_()
    pooled = torch.nn.functional.max_pool2d(x64, kmax, 1, pmax)
    ref.blur_pool2d_reference(pooled, filt_size, stride, tuple(pads), mode).backward(grad)
    backward_checked = set()  # the backward takes only the PREFETCH of a shape: once per value (interpreter time)
    shapes = MAX_BLUR_TUNE[layout][half::2]
    for thread_shape in shapes:
        t, _, prefetch = thread_shape
        xg = x.to(device, torch.float32, copy=True).requires_grad_(prefetch not in backward_checked)
        with ktkernels.use_backend("triton"), max_blur_shape(layout, thread_shape):
            y, codes = op.max_blur_pool2d(xg, kmax, pmax, filt_size, stride, pads, mode)
            if xg.requires_grad:
                y.backward(grad.to(device, torch.float32))
        assert (forward[-1]["T"], forward[-1]["PREFETCH"]) == (t, prefetch)
        assert torch.equal(codes.cpu(), exp_codes), f"argmax codes differ at {thread_shape}"
        assert torch.equal(y.isnan().cpu(), exp_y.isnan()), f"NaN pattern differs at {thread_shape}"
        assert torch.equal(y.nan_to_num(0.0).double().cpu(), exp_y.nan_to_num(0.0)), f"values differ at {thread_shape}"
        if xg.requires_grad:
            assert backward[-1]["PREFETCH"] == prefetch
            assert_close(xg.grad, x64.grad, torch.float32)
            backward_checked.add(prefetch)
    assert backward_checked == {p for _, _, p in shapes}
    if half == 1:
        assert backward_checked == {p for _, _, p in MAX_BLUR_TUNE[layout]}, "the odd half must hold every PREFETCH"


# (filt_size, stride, mode, adobe pads or none): DH < SH (filt 1-2 at stride 2-3) leaves x rows no window holds
BLUR_PREFETCH_CASES = [(4, 2, "reflect", True), (3, 2, "zero", True), (1, 2, "replicate", False), (2, 3, "zero", False)]


@pytest.mark.parametrize("target", TRITON_TARGETS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("filt_size,stride,mode,padded", BLUR_PREFETCH_CASES)
def test_blur_prefetch_matches_reference(target, layout, filt_size, stride, mode, padded, monkeypatch):
    """Every rows-ahead value ``bench blurpool --tune-blur`` may pick for the Triton blur kernels gives the
    reference's values and gradient (outputs poisoned), on a 37 x 27 image: several row blocks, so that the
    prefetched rows include a first one inside the image. In fp32 on the interpreter and the GPU alike."""
    from ktkernels.bench.blurpool import BLUR_TUNE, blur_prefetch

    device = target[1]

    pads = list(geometry.adobe_pads(filt_size)) * 2 if padded else [0, 0, 0, 0]
    forward = _spy_kernel_options(monkeypatch, "_rolling_blur_kernel")
    adjoint = _spy_kernel_options(monkeypatch, "_rolling_blur_adjoint_kernel")
    poison_outputs(monkeypatch)
    rng = torch.Generator().manual_seed(filt_size * 10 + stride)
    x = torch.randn(1, 3, 37, 27, generator=rng)
    x = x.contiguous(memory_format=torch.channels_last if layout == "NHWC" else torch.contiguous_format)
    x64 = x.double().requires_grad_()
    expected = ref.blur_pool2d_reference(x64, filt_size, stride, tuple(pads), mode)
    grad = torch.randn(expected.shape, generator=rng)
    expected.backward(grad.double())
    for prefetch in BLUR_TUNE:
        xg = x.to(device, copy=True).requires_grad_()
        with ktkernels.use_backend("triton"), blur_prefetch(layout, prefetch):
            y = op.blur_pool2d(xg, filt_size, stride, pads, mode)
            y.backward(grad.to(device))
        assert (forward[-1]["PREFETCH"], adjoint[-1]["PREFETCH"]) == (prefetch, prefetch)
        assert_close(y, expected, torch.float32)
        assert_close(xg.grad, x64.grad, torch.float32)


@pytest.mark.skipif(not INTERPRET, reason="times the Triton kernels under the interpreter")
def test_bench_tune_blur_times_every_prefetch(monkeypatch):
    """``python -m ktkernels.bench blurpool --tune-blur``: one row per rows-ahead value and the recipe, per layout
    and mode, each timed, with each value's launches carrying its PREFETCH (forward and adjoint)."""
    from ktkernels.bench.blurpool import BLUR_TUNE, tune_blur

    forward = _spy_kernel_options(monkeypatch, "_rolling_blur_kernel")
    adjoint = _spy_kernel_options(monkeypatch, "_rolling_blur_adjoint_kernel")
    case = ("tiny blur", 2, 12, "blur", 4, (1, 2, 1, 2))
    rows = tune_blur(torch.device("cpu"), 1, [torch.float32], ["NCHW", "NHWC"], [case], reps=1, graphs=False)
    for layout in ("NCHW", "NHWC"):
        for mode in ("fwd", "f+b"):
            timed = {r.impl for r in rows if r.layout == layout and r.mode == mode and r.ms and not r.error}
            assert timed == {f"ktk-triton P{p}" for p in BLUR_TUNE} | {"pytorch"}, (layout, mode, timed)
    assert {o["PREFETCH"] for o in forward} == {o["PREFETCH"] for o in adjoint} == set(BLUR_TUNE)


@pytest.mark.skipif(not INTERPRET, reason="times the Triton kernels under the interpreter")
def test_bench_tune_max_blur_times_every_thread_shape(monkeypatch):
    """``python -m ktkernels.bench blurpool --tune-max-blur``: one row per per-thread shape and the recipe, per
    layout and mode, each timed, and each shape's launches carry its T and PREFETCH. Three shapes stand in for
    MAX_BLUR_TUNE (the interpreter is slow; test_max_blur_forward_thread_shapes checks every shape's results)."""
    from ktkernels.bench import blurpool
    from ktkernels.bench.blurpool import tune_max_blur, tune_name

    shapes = {"NCHW": [(2, 1, 0), (1, 2, 1)], "NHWC": [(1, 2, 2)]}
    monkeypatch.setattr(blurpool, "MAX_BLUR_TUNE", shapes)
    launches = _spy_kernel_options(monkeypatch, "_rolling_max_blur_kernel")
    backward = _spy_kernel_options(monkeypatch, "_rolling_max_blur_backward_kernel")
    case = ("tiny stem", 2, 12, "maxblur", 4, (1, 2, 1, 2))
    rows = tune_max_blur(torch.device("cpu"), 1, [torch.float32], ["NCHW", "NHWC"], case=case, reps=1, graphs=False)
    for layout in ("NCHW", "NHWC"):
        impls = {tune_name(shape) for shape in shapes[layout]} | {"pytorch"}
        assert len(impls) == len(shapes[layout]) + 1, impls
        for mode in ("fwd", "f+b"):
            timed = {r.impl for r in rows if r.layout == layout and r.mode == mode and r.ms and not r.error}
            assert timed == impls, (layout, mode, timed)
    launched = {(o["T"], o["PREFETCH"]) for o in launches}
    assert launched == {(t, p) for layout_shapes in shapes.values() for t, _, p in layout_shapes}
    assert {o["PREFETCH"] for o in backward} == {0, 1, 2}  # the f+b rows time each shape's backward too


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
def test_bench_launch_once_runs_each_kernel_of_the_chosen_cases(monkeypatch, capsys):
    """``bench blurpool --launch-once --cases``: the profiler's workload launches the forward and the backward of
    each chosen case once (nothing else), and ``--tune-max-blur`` refuses cases without a max-blur one."""
    from ktkernels.bench.__main__ import main

    forward = _spy_kernel_options(monkeypatch, "_rolling_blur_kernel")
    adjoint = _spy_kernel_options(monkeypatch, "_rolling_blur_adjoint_kernel")
    max_blur = _spy_kernel_options(monkeypatch, "_rolling_max_blur_kernel")
    main(["blurpool", "--launch-once", "--cases", "timm k3 L4 down", "--batch", "1", "--dtypes", "float32",
          "--layouts", "NHWC"])  # fmt: skip
    assert (len(forward), len(adjoint), len(max_blur)) == (1, 1, 0)
    assert (forward[0]["D"], forward[0]["W"]) == (3, 14)  # timm k3 on 14x14 maps
    with pytest.raises(SystemExit):
        main(["blurpool", "--launch-once", "--tune-max-blur", "--cases", "timm k3 L4 down"])
    assert "needs a max-blur case" in capsys.readouterr().err


def test_bench_table_from_cut_off_log(tmp_path):
    """``bench blurpool --from-log``: a cut-off run's printed rows become a table, with the bytes each case must
    move (checked by hand: the bf16 stem reads 128*64*112^2 and writes 128*64*56^2 elements; f+b doubles that and
    adds the 128*64*111^2 one-byte codes, written and read once, which a forward alone does not form); error lines
    and unknown cases are skipped; the environment is required."""
    import json

    from ktkernels.bench.__main__ import main

    log = tmp_path / "bench.log"
    log.write_text(
        "maxblur k4 stem (128, 64, 112, 112) bfloat16 NCHW fwd ktk-triton: 0.345\n"
        "maxblur k4 stem (128, 64, 112, 112) bfloat16 NCHW f+b ktk-cuda: 4.0\n"
        "adobe k4 L2 down (128, 256, 56, 56) float32 NHWC fwd pytorch: RuntimeError: out of memory\n"
        "adobe k4 L2 down (128, 256, 56, 56) float32 NHWC fwd pytorch+compile: 1.9\n"
        "some other case (1, 2, 3, 4) float32 NHWC fwd pytorch: 1.0\n"
    )
    env = ["device=Test GPU", "torch=2.11", "triton=3.6", "commit=abc", "date=today", "timing=graphs"]
    with pytest.raises(SystemExit):
        main(["blurpool", "--from-log", str(log), "--copy-gbps", "1000", *[f"--env={e}" for e in env[:-1]]])
    main(["blurpool", "--from-log", str(log), "--copy-gbps", "1000", "--out", str(tmp_path)]
         + [f"--env={e}" for e in env])  # fmt: skip
    rows = json.loads((tmp_path / "blurpool_test_gpu.json").read_text())["rows"]
    stem, codes = (128 * 64 * 112 * 112 + 128 * 64 * 56 * 56) * 2, 128 * 64 * 111 * 111
    assert [(r["impl"], r["bytes"]) for r in rows] == [
        ("ktk-triton", stem),
        ("ktk-cuda", 2 * (stem + codes)),
        ("pytorch+compile", (128 * 256 * 56 * 56 + 128 * 256 * 28 * 28) * 4),
    ]
    assert rows[0]["pct_copy"] == pytest.approx(100 * stem / 0.345 / 1e6 / 1000)


def test_bench_tune_choice_from_cut_off_log(tmp_path, monkeypatch):
    """``bench blurpool --from-log --tune-max-blur``: a tune run's rows (names with a space) become the tune table,
    whose notes name per layout the setting with the least geometric mean of its f+b times over the (case, dtype)
    groups, among those timed in every group, against the default (numbers checked by hand)."""
    from ktkernels.bench import blurpool
    from ktkernels.bench.__main__ import main
    from ktkernels.blurpool import triton as kernels

    monkeypatch.setattr(kernels, "MAX_BLUR_SHAPE", {False: (2, 1, 0), True: (1, 2, 0)})
    monkeypatch.setattr(kernels, "BLUR_PREFETCH", {False: 0, True: 0})
    stem = "maxblur k4 stem (128, 64, 112, 112)"
    log = tmp_path / "bench_tune.log"
    log.write_text(
        f"{stem} bfloat16 NCHW fwd ktk-triton T2xC1: 0.1\n"  # forward rows do not count
        f"{stem} bfloat16 NCHW f+b ktk-triton T2xC1: 0.6\n"
        f"{stem} float32 NCHW f+b ktk-triton T2xC1: 0.8\n"
        f"{stem} bfloat16 NCHW f+b ktk-triton T2xC1P1: 0.4\n"
        f"{stem} float32 NCHW f+b ktk-triton T2xC1P1: 0.5\n"
        f"{stem} bfloat16 NCHW f+b ktk-triton T4xC1: 0.3\n"  # the run was cut before its float32 row
        f"{stem} float32 NCHW f+b pytorch: 9.0\n"
        f"{stem} bfloat16 NHWC f+b ktk-triton T1xC2: 0.7\n"
        f"{stem} bfloat16 NHWC f+b ktk-triton T2xC2: RuntimeError: failed: 2\n"
    )
    env = ["device=Test GPU", "torch=2.11", "triton=3.6", "commit=abc", "date=today", "timing=graphs"]
    main(["blurpool", "--from-log", str(log), "--tune-max-blur", "--copy-gbps", "1000", "--out", str(tmp_path)]
         + [f"--env={e}" for e in env])  # fmt: skip
    table = (tmp_path / "blurpool_tune_max_blur_test_gpu.md").read_text()
    assert "| 0.400 |" in table and "ktk-triton T4xC1" in table
    assert (
        "- NCHW: ktk-triton T2xC1P1, f+b geometric mean 0.447 ms over 2 (case, dtype) groups (the default "
        "ktk-triton T2xC1: 0.693 ms, 1.55x; untimed: ['ktk-triton T1xC2', 'ktk-triton T1xC2P1', 'ktk-triton "
        "T2xC1P2', 'ktk-triton T4xC1']) -> triton.MAX_BLUR_SHAPE[False] = (2, 1, 1)\n" in table
    ), table
    assert "- NHWC: ktk-triton T1xC2, f+b geometric mean 0.700 ms over 1 (case, dtype) groups (the default " in table
    assert "1.00x" in table and "-> triton.MAX_BLUR_SHAPE[True] = (1, 2, 0)" in table
    blur_rows = blurpool.rows_from_log(
        "adobe k4 L4 down (128, 1024, 14, 14) bfloat16 NCHW f+b ktk-triton P0: 0.172\n"
        "adobe k4 L4 down (128, 1024, 14, 14) bfloat16 NCHW f+b ktk-triton P2: 0.1\n"
    )
    (choice,) = blurpool.tune_choices(blur_rows, "blur")
    assert choice.startswith("NCHW: ktk-triton P2, f+b geometric mean 0.100 ms") and "1.72x" in choice, choice
    assert choice.endswith("-> triton.BLUR_PREFETCH[False] = 2"), choice


def test_tune_tables_start_with_the_defaults():
    """A tune table checks every setting's results against the first one's (``harness.agreement``), so the first
    must be the setting the library runs today."""
    pytest.importorskip("triton")
    from ktkernels.bench.blurpool import BLUR_TUNE, MAX_BLUR_TUNE
    from ktkernels.blurpool import triton as kernels

    for layout in ("NCHW", "NHWC"):
        assert MAX_BLUR_TUNE[layout][0] == kernels.MAX_BLUR_SHAPE[layout == "NHWC"], layout
        assert BLUR_TUNE[0] == kernels.BLUR_PREFETCH[layout == "NHWC"], layout


def test_bench_warm_up_goes_on_past_a_failing_job(monkeypatch, capsys):
    """One kernel that fails to compile or launch in the warm-up must not cost the table's other rows: it is
    reported, and the other jobs run."""
    from ktkernels.bench import blurpool

    ran = []

    def warm_job(device, batch, case, dtype_name, layout, setting):
        if setting == ("maxblur", (4, 1, 0)):
            raise RuntimeError("out of resources: shared memory")
        ran.append((case[0], dtype_name, layout, setting))

    monkeypatch.setattr(blurpool, "_warm_job", warm_job)
    stem = ("tiny stem", 2, 12, "maxblur", 4, (1, 2, 1, 2))
    jobs = blurpool.triton_warm_jobs([torch.float32], ["NCHW"], [stem], tune="max-blur")
    blurpool.warm_triton_cache(torch.device("cpu"), 1, jobs, workers=1)
    assert len(ran) == len(jobs) - 1 and ("maxblur", (4, 1, 0)) not in {r[3] for r in ran}
    out = capsys.readouterr().out
    assert "warm-up failed: tiny stem float32 NCHW ('maxblur', (4, 1, 0)): RuntimeError: out of resources" in out


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
def test_bench_warm_jobs_launch_every_tuned_shape(monkeypatch):
    """``--jit-workers``: the warm-up jobs cover every (case, dtype, layout) of a table, and for the tune table
    every per-thread shape, each launched with its own T (run in-process: workers=1)."""
    from ktkernels.bench.blurpool import BLUR_TUNE, MAX_BLUR_TUNE, triton_warm_jobs, warm_triton_cache

    stem, blur = ("tiny stem", 2, 12, "maxblur", 4, (1, 2, 1, 2)), ("tiny blur", 2, 9, "blur", 3, (1, 1, 1, 1))
    jobs = triton_warm_jobs([torch.float32, torch.bfloat16], ["NCHW", "NHWC"], [stem, blur])
    assert sorted((j[0][0], j[1], j[2]) for j in jobs) == sorted(
        (c[0], d, lay) for c in (stem, blur) for d in ("float32", "bfloat16") for lay in ("NCHW", "NHWC")
    )
    tune_jobs = triton_warm_jobs([torch.float32], ["NCHW", "NHWC"], [stem, blur], tune="max-blur")
    expected = [(lay, ("maxblur", s)) for lay in ("NCHW", "NHWC") for s in MAX_BLUR_TUNE[lay]]
    assert [(j[2], j[3]) for j in tune_jobs] == expected
    blur_jobs = triton_warm_jobs([torch.float32], ["NHWC"], [blur], tune="blur")
    assert [j[3] for j in blur_jobs] == [("blur", p) for p in BLUR_TUNE]
    one_job_per_launch = {}  # (T, PREFETCH) -> the first job with it: both layouts share most (interpreter time)
    for job in tune_jobs:
        one_job_per_launch.setdefault(job[3][1][::2], job)
    launches = _spy_kernel_options(monkeypatch, "_rolling_max_blur_kernel")
    warm_triton_cache(torch.device("cpu"), 1, list(one_job_per_launch.values()), workers=1)
    launched = {(o["T"], o["PREFETCH"]) for o in launches}
    assert launched == {(t, p) for shapes in MAX_BLUR_TUNE.values() for t, _, p in shapes} == set(one_job_per_launch)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_max_blur_pool2d_low_precision(target, dtype):
    """Distinct values (a permutation) so that low-precision inputs have no ties either."""
    name, device = target
    n, c, h, w = 2, 3, 12, 9
    values = torch.randperm(n * c * h * w).double() / 64 - 8  # exact in bf16 for this range
    x = values.view(n, c, h, w).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    with ktkernels.use_backend(name):
        y = ktkernels.max_blur_pool2d(x)
    exp_y, _ = ref.max_blur_pool2d_reference(x.double().cpu(), 2, 0, 4, 2, (1, 2, 1, 2), "reflect")
    assert_close(y, exp_y, dtype)


def _every_half_bit_pattern(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """All 2^16 bit patterns of a 16-bit float (subnormals, +-inf, NaNs) in a random order, as (1, 16, 64, 64)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    bits = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(seed))]
    return bits.view(dtype).view(1, 16, 64, 64)


def _large_finite_values(dtype: torch.dtype, shape: torch.Size, seed: int) -> torch.Tensor:
    """Finite values of at least a quarter of the dtype's largest, both signs: sums of a few of them overflow."""
    values = _every_half_bit_pattern(dtype, seed).flatten()
    values = values[torch.isfinite(values) & (values.abs() >= torch.finfo(dtype).max / 4)]
    pick = torch.randint(values.numel(), shape, generator=torch.Generator().manual_seed(seed))
    return values[pick]


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equal, except that any NaN matches any NaN (payloads are not specified)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    bad = (a.view(torch.int16) != e.view(torch.int16)).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} elements differ, e.g. {a[bad[:4]].tolist()} vs {e[bad[:4]].tolist()}"
    )


HALF_OPS = {
    "identity": lambda x: ktkernels.blur_pool2d(x, filt_size=1, stride=1, padding=0),
    "k3-s1-reflect": lambda x: ktkernels.blur_pool2d(x, filt_size=3, stride=1, padding=1),
    "adobe": lambda x: ktkernels.blur_pool2d(x),
    "1d": lambda x: ktkernels.blur_pool1d(x.flatten(2), filt_size=5, stride=3, padding=(2, 1), pad_mode="replicate"),
    "max-blur": lambda x: ktkernels.max_blur_pool2d(x),
    "max-blur-k3": lambda x: ktkernels.max_blur_pool2d(x, max_kernel=3, max_padding=1, pad_mode="zero"),
}


@pytest.mark.parametrize("op_name", sorted(HALF_OPS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grads", ["every-pattern", "large"])
def test_cpu_half_precision_is_the_fp32_kernel_rounded(grads, dtype, layout, op_name):
    """The C++ CPU kernels widen 16-bit inputs to fp32, run the fp32 maths and round once at the end, so their
    outputs and gradients must equal, bit for bit, those of the fp32 kernel on the widened tensors, rounded by
    torch. Fed every bit pattern as input, and every pattern or large finite values as gradient, this pins the
    hand-written fp16 conversions of csrc/common/cpu_convert.h: subnormals, round-half-even ties, overflow to inf
    (the sums of large gradients), inf and NaN."""
    fn = HALF_OPS[op_name]
    x = _every_half_bit_pattern(dtype, seed=0)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.requires_grad_()
    wide = x.detach().float().requires_grad_()
    with ktkernels.use_backend("cpu"):
        y = fn(x)
        y_wide = fn(wide)
        if grads == "large":
            grad = _large_finite_values(dtype, y.shape, seed=1)
        else:
            grad = _every_half_bit_pattern(dtype, seed=1).flatten()[: y.numel()].view(y.shape)
        (gx,) = torch.autograd.grad(y, x, grad)
        (gx_wide,) = torch.autograd.grad(y_wide, wide, grad.float())
    _assert_same_bits(y, y_wide.to(dtype), "output")
    _assert_same_bits(gx, gx_wide.to(dtype), "grad_input")
    if op_name == "identity":
        _assert_same_bits(y, x.detach(), "identity")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_worked_examples_from_the_anchors(target):
    """Values published for antialiased-cnns / kornia on eye(5) and 1..5 (reference notes section 2.4)."""
    name, device = target
    eye = torch.eye(5, dtype=torch.float64, device=device).view(1, 1, 5, 5)
    expected = {
        (3, "zero"): [[0.3125, 0.0625, 0], [0.0625, 0.375, 0.0625], [0, 0.0625, 0.3125]],
        (3, "reflect"): [[0.5, 0.125, 0], [0.125, 0.375, 0.125], [0, 0.125, 0.5]],
        (4, "reflect"): [[0.40625, 0.109375, 0.015625], [0.109375, 0.3125, 0.28125], [0.015625, 0.28125, 0.40625]],
        (4, "zero"): [[0.296875, 0.09375, 0], [0.09375, 0.3125, 0.09375], [0, 0.09375, 0.15625]],
    }
    line = torch.arange(1.0, 6.0, dtype=torch.float64, device=device).view(1, 1, 5)
    expected_1d = {
        (3, "replicate"): [1.25, 3.0, 4.75],
        (4, "zero"): [1.5, 3.5, 2.375],
        (5, "reflect"): [1.75, 3.0, 4.25],
    }
    with ktkernels.use_backend(name):
        for (k, mode), values in expected.items():
            dtype = torch.float64 if name != "cuda" else torch.float32
            got = ktkernels.blur_pool2d(eye.to(dtype), filt_size=k, pad_mode=mode)
            assert torch.equal(got.double().cpu()[0, 0], torch.tensor(values, dtype=torch.float64)), (k, mode)
        for (k, mode), values in expected_1d.items():
            got = ktkernels.blur_pool1d(line.float(), filt_size=k, pad_mode=mode)
            assert torch.equal(got.double().cpu()[0, 0], torch.tensor(values, dtype=torch.float64)), (k, mode)


# Written out, not computed: the reference and the kernels' tables share geometry.binomial_taps, so a wrong row
# there would pass every comparison with the reference.
PASCAL_ROWS = {1: [1], 2: [1, 1], 3: [1, 2, 1], 4: [1, 3, 3, 1], 5: [1, 4, 6, 4, 1], 6: [1, 5, 10, 10, 5, 1],
               7: [1, 6, 15, 20, 15, 6, 1]}  # fmt: skip


def literal_blur(x: torch.Tensor, k: int, stride: int, pads: list[int], mode: str) -> torch.Tensor:
    """F.pad + depthwise conv with the written-out binomial row, in float64, for (N, C, L) or (N, C, H, W)."""
    row = torch.tensor(PASCAL_ROWS[k], dtype=torch.float64) / 2 ** (k - 1)
    x = torch.nn.functional.pad(x, pads, mode={"zero": "constant"}.get(mode, mode))
    c = x.shape[1]
    if x.dim() == 3:
        return torch.nn.functional.conv1d(x, row.expand(c, 1, k), stride=stride, groups=c)
    return torch.nn.functional.conv2d(x, torch.outer(row, row).expand(c, 1, k, k), stride=stride, groups=c)


@pytest.mark.parametrize("target", TARGETS)
def test_filters_are_the_rows_of_pascals_triangle(target):
    """Every filt_size on every op, against the written-out rows (the worked examples cover k = 3 and 4 only)."""
    name, device = target
    dtype = torch.float32 if name == "cuda" else torch.float64
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    x1 = torch.randn(2, 3, 13, dtype=torch.float64)
    with ktkernels.use_backend(name):
        for k in PASCAL_ROWS:
            mode, pads, stride = ("reflect", "zero")[k % 2], list(geometry.adobe_pads(k)) * 2, 1 + k % 2
            got = ktkernels.blur_pool2d(x.to(device, dtype), k, stride, pads, mode)
            assert_close(got, literal_blur(x, k, stride, pads, mode), dtype)
            got = ktkernels.blur_pool1d(x1.to(device, dtype), k, stride, pads[:2], mode)
            assert_close(got, literal_blur(x1, k, stride, pads[:2], mode), dtype)
            got = ktkernels.max_blur_pool2d(x.to(device, dtype), k, stride, pads, mode)
            maxed = torch.nn.functional.max_pool2d(x, 2, 1)
            assert_close(got, literal_blur(maxed, k, stride, pads, mode), dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_empty_batch_and_channels(target):
    name, device = target
    with ktkernels.use_backend(name):
        for shape in [(0, 3, 8, 8), (2, 0, 8, 8)]:
            x = torch.randn(shape, device=device, requires_grad=True)
            y = ktkernels.blur_pool2d(x)
            assert y.shape == (*shape[:2], 4, 4)
            y.sum().backward()
            assert x.grad.shape == shape
            assert ktkernels.max_blur_pool2d(x).shape == (*shape[:2], 4, 4)
        assert ktkernels.blur_pool1d(torch.randn(0, 3, 9, device=device)).shape == (0, 3, 5)


@pytest.mark.parametrize("target", TARGETS)
def test_empty_spatial_axis_with_zero_padding(target, monkeypatch):
    """Zero padding of an empty axis leaves windows of zeros only: the output is all zeros (F.pad + conv agree),
    its gradient is empty. Outputs, and the reference's own allocations, start as NaN."""
    name, device = target
    poison_outputs(monkeypatch)
    cases = [  # (op, reference, arguments, input shape, output shape)
        (ktkernels.blur_pool2d, ref.blur_pool2d_reference, (3, 1, (1, 1, 2, 2)), (2, 3, 0, 6), (2, 3, 2, 6)),
        (ktkernels.blur_pool2d, ref.blur_pool2d_reference, (4, 2, (2, 2, 1, 2)), (2, 3, 5, 0), (2, 3, 3, 1)),
        (ktkernels.blur_pool1d, ref.blur_pool1d_reference, (2, 1, (1, 2)), (2, 3, 0), (2, 3, 2)),
    ]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty and friends then fill with NaN
    try:
        for blur, reference, args, in_shape, out_shape in cases:
            x = torch.randn(in_shape, device=device, requires_grad=True)
            with ktkernels.use_backend(name):
                y = blur(x, *args, "zero")
                assert y.shape == out_shape
                assert torch.equal(y.detach().cpu(), torch.zeros(out_shape))
                (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
            assert grad.shape == in_shape
            expected = reference(x.detach().double().cpu(), *args, "zero")  # the reference runs on the CPU
            assert torch.equal(expected, torch.zeros(out_shape, dtype=torch.float64))
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_max_blur_ops_refuse_empty_spatial_axes(device):
    """The C++/CUDA max-blur ops called directly (past the op's ValueError): an empty input axis, whose max-pool
    windows would hold padding only, raises instead of reading outside the input."""
    from ktkernels import _C  # noqa: F401  (registers torch.ops.ktkernels_C)

    x, grad = torch.randn(2, 3, 0, 2, device=device), torch.randn(2, 3, 1, 1, device=device)
    codes = torch.zeros(2, 3, 1, 2, dtype=torch.uint8, device=device)
    index, weight = torch.zeros(1, 1, dtype=torch.int32, device=device), torch.ones(1, 1, device=device)
    tables = (index, weight, index, weight)  # the row and the column (index, weight) tables
    with pytest.raises(RuntimeError, match="non-empty spatial sizes"):
        torch.ops.ktkernels_C.max_blur_forward_(x, 2, 1, 1, 1, *tables, torch.empty_like(grad), codes)
    with pytest.raises(RuntimeError, match="non-empty spatial sizes"):
        torch.ops.ktkernels_C.max_blur_backward_(grad, codes, 2, 1, *tables, torch.empty_like(x))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_backward_is_deterministic(target):
    """Bitwise-equal gradients over runs. The CUDA C++ kernels get maps large enough for float atomics, were there
    any, to add in a different order each run; the Triton kernels keep the test shape, for which the GPU run carries
    precompiled kernels (each shape is a compile), and the interpreter runs programs one at a time. So the source
    check below is what holds for every backend."""
    name, device = target
    shape = (8, 64, 57, 55) if name == "cuda" else (2, 4, 15, 14)
    x = torch.randn(shape, device=device)
    with ktkernels.use_backend(name):
        for layout in (torch.contiguous_format, torch.channels_last):
            for fn in (ktkernels.blur_pool2d, ktkernels.max_blur_pool2d):
                xl = x.detach().to(memory_format=layout).requires_grad_()
                y = fn(xl)
                grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(device)
                runs = [torch.autograd.grad(fn(xl), xl, grad)[0] for _ in range(3)]
                assert all(torch.equal(runs[0], run) for run in runs[1:]), (fn.__name__, layout)


def test_kernel_sources_have_no_float_atomics():
    """Deterministic backwards by construction: each gradient element is gathered by one program or thread. (The
    CUDA max-blur's shared-memory integer atomicMin/atomicMax of table bounds are order-independent.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(root, "ktkernels", "blurpool", "triton.py")]
    sources += [os.path.join(root, "csrc", "blurpool", f) for f in os.listdir(os.path.join(root, "csrc", "blurpool"))]
    assert len(sources) >= 5
    for path in sources:
        with open(path) as f:
            text = f.read()
        found = re.findall(r"atomic(?:Add|Sub|Exch|CAS)|tl\.atomic_\w+|\.atomic_\w+\(", text)
        assert not found, f"{path} uses {found}"


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] != "cuda"])  # CUDA C++ has no fp64
def test_gradcheck_fp64(target):
    name, device = target
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, device=device, requires_grad=True)
    x1 = torch.randn(2, 2, 9, dtype=torch.float64, device=device, requires_grad=True)
    with ktkernels.use_backend(name):
        for mode in ("reflect", "zero", "replicate"):
            fn = lambda t, mode=mode: op.blur_pool2d(t, 3, 2, [1, 2, 0, 1], mode)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradcheck(lambda t: op.blur_pool1d(t, 4, 2, [1, 2], "reflect"), (x1,), fast_mode=True)
        assert torch.autograd.gradgradcheck(lambda t: op.blur_pool1d(t, 4, 2, [1, 2], "reflect"), (x1,), fast_mode=True)
        for kmax, pmax in ((2, 0), (3, 1)):
            fn = lambda t, k=kmax, p=pmax: ktkernels.max_blur_pool2d(t, max_kernel=k, max_padding=p)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
            # The double backward blurs the max map gathered with the codes: the blur op and torch ops on every
            # backend. Under the interpreter its numerical check takes 35 s; the torch.func test covers it there.
            if not (name == "triton" and device == "cpu"):
                assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_opcheck(target):
    name, device = target
    x = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    xl = torch.randn(2, 3, 9, 8, device=device).to(memory_format=torch.channels_last).requires_grad_()
    x1 = torch.randn(2, 3, 11, device=device, requires_grad=True)
    g = torch.randn(2, 3, 5, 4, device=device)
    with ktkernels.use_backend(name):
        for t in (x, xl):
            torch.library.opcheck(op.blur_pool2d, (t, 4, 2, [1, 2, 1, 2], "reflect"))
            torch.library.opcheck(op.max_blur_pool2d, (t, 2, 0, 4, 2, [1, 2, 1, 2], "zero"))
            torch.library.opcheck(op.max_blur_pool2d_inference, (t.detach(), 3, 1, 3, 2, [1, 1, 1, 1], "reflect"))
        torch.library.opcheck(op.blur_pool2d_backward, (g, [9, 8], 4, 2, [1, 2, 1, 2], "reflect", False))
        torch.library.opcheck(op.blur_pool1d, (x1, 3, 2, [1, 1], "replicate"))
        g1 = torch.randn(2, 3, 6, device=device)
        torch.library.opcheck(op.blur_pool1d_backward, (g1, [11], 3, 2, [1, 1], "replicate", False))
        _, codes = op.max_blur_pool2d(x.detach(), 2, 0, 4, 2, [1, 2, 1, 2], "zero")
        g = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)  # its double backward is registered too
        torch.library.opcheck(op.max_blur_pool2d_backward, (g, codes, [9, 8], 2, 0, 4, 2, [1, 2, 1, 2], "zero", False))


def test_max_blur_backward_makes_no_gradient_for_the_codes():
    """The uint8 codes have no gradient: autograd must not materialise a zero tensor of their size (the max map's)
    for the backward on every call, as it does by default for an output that got no gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class RecordUint8(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [str(func) for t in tree_leaves(out) if isinstance(t, Tensor) and t.dtype == torch.uint8]
            return out

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with ktkernels.use_backend("cpu"):
        y, codes = op.max_blur_pool2d(x, 2, 0, 4, 2, [1, 2, 1, 2], "reflect")
        with RecordUint8() as record:
            y.sum().backward()
    assert codes.dtype == torch.uint8 and record.made == [], f"uint8 tensors made in the backward: {record.made}"
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_torch_compile_fullgraph(target):
    name, device = target
    torch._dynamo.reset()
    modules = [
        (ktkernels.BlurPool2d(4), (2, 4, 10, 9)),
        (ktkernels.MaxBlurPool2d(4), (2, 4, 10, 9)),
        (ktkernels.BlurPool1d(4, pad_type="zero", filt_size=5), (2, 4, 17)),
    ]
    with ktkernels.use_backend(name):
        for module, shape in modules:
            x = torch.randn(shape, device=device, requires_grad=True)
            compiled = torch.compile(module.to(device), fullgraph=True)
            y = compiled(x)
            y.square().sum().backward()
            x_eager = x.detach().clone().requires_grad_()
            y_eager = module(x_eager)
            y_eager.square().sum().backward()
            assert torch.equal(y, y_eager)
            assert torch.equal(x.grad, x_eager.grad)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated in torch 2.14, still in use
@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")  # none of ours: the traced tests are meant to be fixed
def test_torch_jit_trace_of_a_trainable_model():
    """``torch.jit.trace`` with grad on: its check traces again under no_grad and must find the same graph (the
    max-blur's form must not follow the grad mode while tracing), and the traced model trains like the eager one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), ktkernels.MaxBlurPool2d(4), torch.nn.ReLU(), ktkernels.BlurPool2d(4, filt_size=3)
    )
    x = torch.randn(2, 3, 13, 12)
    with ktkernels.use_backend("cpu"):
        traced = torch.jit.trace(model, x)  # raises TracingCheckError if the two graphs differ
        assert torch.equal(traced(x), model(x))
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))
        grads = [torch.autograd.grad(m(x).square().sum(), model[0].weight)[0] for m in (traced, model)]
    assert torch.equal(*grads)


def test_torch_compile_dynamic_shapes_trace_once():
    """``torch.compile(dynamic=True)``: the ops' validation and plans run on symbolic sizes (uncached), one graph
    serves every shape, forward and backward, and the values match eager. CPU kernels (the Triton ones specialise
    on sizes anyway)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    modules = [
        (ktkernels.BlurPool2d(4), [(2, 4, 10, 9), (3, 4, 13, 12)]),
        (ktkernels.MaxBlurPool2d(4, filt_size=3), [(2, 4, 10, 9), (3, 4, 17, 8)]),
        (ktkernels.BlurPool1d(4, pad_type="zero", filt_size=5), [(2, 4, 17), (3, 4, 22)]),
    ]
    with ktkernels.use_backend("cpu"):
        for module, shapes in modules:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("aot_eager")  # traces the ops on symbolic sizes; no codegen
            compiled = torch.compile(lambda t, m=module: m(t).square().sum(), backend=counter, dynamic=True)
            for shape in shapes:
                x = torch.randn(shape, requires_grad=True)
                compiled(x).backward()
                x_eager = x.detach().clone().requires_grad_()
                module(x_eager).square().sum().backward()
                torch.testing.assert_close(x.grad, x_eager.grad)
            assert counter.frame_count == 1, f"{type(module).__name__} recompiled for a new shape"


def test_module_state_dict_and_attributes():
    layer = ktkernels.BlurPool2d(6, pad_type="refl", filt_size=5, stride=3, pad_off=1)
    assert (layer.filt_size, layer.stride, layer.pad_off, layer.channels) == (5, 3, 1, 6)
    assert layer.pad_sizes == [3, 3, 3, 3] and layer.pad_type == "reflect"
    state = layer.state_dict()
    assert list(state) == ["filt"] and state["filt"].shape == (6, 1, 5, 5)
    assert torch.equal(state["filt"][3, 0], geometry.binomial_filter2d(5))
    ktkernels.BlurPool2d(6, filt_size=5).load_state_dict(state, strict=True)
    assert ktkernels.BlurPool1d(4).state_dict()["filt"].shape == (4, 1, 3)
    assert ktkernels.MaxBlurPool2d(8).state_dict()["filt"].shape == (8, 1, 4, 4)
    # pad_off widens the output the way antialiased-cnns does: floor((H - 1 + 2*pad_off) / s) + 1
    assert ktkernels.BlurPool2d(2, pad_off=1)(torch.randn(1, 2, 8, 8)).shape == (1, 2, 5, 5)
    assert ktkernels.BlurPool2d(None)(torch.randn(1, 7, 8, 8)).shape == (1, 7, 4, 4)


def test_modules_match_functional_and_reference():
    x = torch.randn(2, 3, 21, 18)
    for pad_type, k in itertools.product(("reflect", "repl", "zero"), (1, 2, 3, 4, 7)):
        layer = ktkernels.BlurPool2d(3, pad_type=pad_type, filt_size=k)
        mode = geometry.canonical_pad_mode(pad_type)
        expected = ref.blur_pool2d_reference(x.double(), k, 2, tuple(layer.pad_sizes), mode)
        assert_close(layer(x), expected, torch.float32)
    stem = ktkernels.MaxBlurPool2d(3)
    expected = ref.blur_pool2d_reference(
        torch.nn.functional.max_pool2d(x.double(), 2, 1), 4, 2, (1, 2, 1, 2), "reflect"
    )
    assert_close(stem(x), expected, torch.float32)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ktkernels.blur_pool2d(torch.randn(3, 8, 8)), ValueError, "4-D"),
        (lambda: ktkernels.blur_pool2d(torch.ones(1, 1, 8, 8, dtype=torch.int32)), TypeError, "floating"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), filt_size=8), ValueError, "filt_size"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), filt_size=0), ValueError, "filt_size"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), stride=0), ValueError, "stride"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), stride=5), ValueError, "stride"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), pad_mode="circular"), ValueError, "circular"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 2, 8)), ValueError, "reflect padding"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), padding=(1, -1, 0, 0)), ValueError, "pad"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 2, 2), padding=0, pad_mode="zero"), ValueError, "smaller"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), filt_size=2.5), TypeError, "filt_size"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8), stride=2.0), TypeError, "stride"),
        (lambda: ktkernels.blur_pool1d(torch.randn(1, 1, 8), padding=(1.5, 1)), TypeError, "pad"),
        (lambda: ktkernels.BlurPool2d(4, filt_size=9), ValueError, "filt_size"),
        (lambda: ktkernels.MaxBlurPool2d(4, max_kernel=5), ValueError, "max_kernel"),
        (lambda: ktkernels.BlurPool2d(4)(torch.randn(1, 2, 8, 8)), ValueError, "4 channels"),
        (lambda: ktkernels.BlurPool1d(4)(torch.randn(1, 8, 8)), ValueError, "4 channels"),
        (lambda: ktkernels.BlurPool2d(4, pad_type="wrap"), ValueError, "wrap"),
        (lambda: ktkernels.BlurPool2d(4, filt_size=3, pad_off=-2), ValueError, "negative"),
        (lambda: ktkernels.blur_pool1d(torch.randn(1, 8, 8, 8)), ValueError, "3-D"),
        (lambda: ktkernels.max_blur_pool2d(torch.randn(1, 1, 8, 8), max_kernel=4), ValueError, "max_kernel"),
        (lambda: ktkernels.max_blur_pool2d(torch.randn(1, 1, 1, 8), pad_mode="zero"), ValueError, "sizes >= 2"),
        (lambda: ktkernels.max_blur_pool2d(torch.randn(0, 1, 8, 2), max_kernel=3), ValueError, "sizes >= 3"),
        (lambda: ktkernels.MaxBlurPool2d(1)(torch.randn(1, 1, 8, 1)), ValueError, r"got \(8, 1\)"),
        (lambda: ktkernels.max_blur_pool2d(torch.randn(1, 1, 0, 4), 1, 1, 0, "zero", 2, 1), ValueError, "sizes >= 1"),
        (lambda: ktkernels.blur_pool2d(torch.randn(1, 1, 0, 8), 3, 1, 2, "replicate"), ValueError, "non-empty"),
        (lambda: ktkernels.blur_pool1d(torch.randn(1, 1, 0), 2, 1, 1, "reflect"), ValueError, "non-empty"),
        (
            lambda: ktkernels.max_blur_pool2d(torch.randn(1, 1, 8, 8), max_kernel=2, max_padding=2),
            ValueError,
            "max_padding",
        ),
    ],
)
def test_bad_input_raises_before_any_kernel(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("target", TARGETS)
def test_backward_ops_refuse_a_grad_or_codes_of_another_forward(target):
    """The backward ops are public: a grad whose sizes are not the forward's outputs for ``input_size``, or argmax
    codes of another dtype, shape or device, raise before any kernel runs (the Triton and CUDA kernels would read
    past the tensors). The forward's outputs pass."""
    name, device = target
    x = torch.randn(2, 3, 9, 10, device=device)
    with ktkernels.use_backend(name):
        y, codes = op.max_blur_pool2d(x, 2, 0, 4, 2, [1, 2, 1, 2], "reflect")
    grad = torch.randn_like(y)  # (2, 3, 4, 5): the max map is 8 x 9
    grad2, grad1 = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 3, 5, device=device)
    blur2d = ([9, 10], 4, 2, [1, 2, 1, 2], "reflect", False)
    max2d = ([9, 10], 2, 0, 4, 2, [1, 2, 1, 2], "reflect", False)
    cases = [
        (
            op.blur_pool2d_backward,
            (grad2[..., :-1], *blur2d),
            ValueError,
            r"grad has shape \(2, 3, 5, 4\), but .* \(5, 5\)",
        ),
        (op.blur_pool2d_backward, (grad2, [9, 10, 1], *blur2d[1:]), ValueError, "expects 2 input sizes"),
        (op.blur_pool2d_backward, (grad2, [-1, 10], *blur2d[1:]), ValueError, "input size must be >= 0"),
        (op.blur_pool2d_backward, (grad2.long(), *blur2d), TypeError, "floating-point grad"),
        (op.blur_pool1d_backward, (grad1, [13], 4, 2, [1, 2], "reflect", False), ValueError, r"\(13,\) gives .*\(7,\)"),
        (op.blur_pool1d_backward, (grad2, [10], 4, 2, [1, 2], "reflect", False), ValueError, "3-D grad"),
        (op.max_blur_pool2d_backward, (grad, codes.long(), *max2d), TypeError, "uint8 argmax codes"),
        (op.max_blur_pool2d_backward, (grad, codes[:, :2], *max2d), ValueError, r"codes have shape \(2, 2, 8, 9\)"),
        (op.max_blur_pool2d_backward, (grad, codes[0], *max2d), ValueError, r"codes have shape \(3, 8, 9\)"),
        (op.max_blur_pool2d_backward, (grad, codes, [9, 12], *max2d[1:]), ValueError, r"\(2, 3, 8, 11\)"),
        (op.max_blur_pool2d_backward, (grad[:, :, :-1], codes, *max2d), ValueError, "grad has shape"),
        (op.max_blur_pool2d_backward, (grad, codes, [9, 10], 4, *max2d[2:]), ValueError, "max_kernel"),
    ]
    if device != "cpu":
        cases.append((op.max_blur_pool2d_backward, (grad, codes.cpu(), *max2d), ValueError, "codes are on cpu"))
    with ktkernels.use_backend(name):
        for call, args, error, match in cases:
            with pytest.raises(error, match=match):
                call(*args)
        assert op.blur_pool2d_backward(grad2[:, :, :, :-1], [9, 8], *blur2d[1:]).shape == (2, 3, 9, 8)
        assert op.max_blur_pool2d_backward(grad, codes, *max2d).shape == x.shape
        assert op.blur_pool1d_backward(grad1, [10], 4, 2, [1, 2], "reflect", False).shape == (2, 3, 10)


def _axis_is_valid(size: int, before: int, after: int, filt_size: int, mode: str) -> bool:
    """Whether pad + conv is defined on one axis: F.pad reflects and replicates only non-empty axes, reflect
    only by less than the size, and the padded axis must hold one window."""
    if mode != "zero" and size < 1:
        return False
    if mode == "reflect" and max(before, after) >= size:
        return False
    return size + before + after >= filt_size


def _blur_family(x, kind: str, k: int, s: int, pads: list[int], mode: str, kmax: int, pmax: int) -> torch.Tensor:
    if kind == "blur2d":
        return ktkernels.blur_pool2d(x, k, s, pads, mode)
    if kind == "blur1d":
        return ktkernels.blur_pool1d(x, k, s, pads, mode)
    return ktkernels.max_blur_pool2d(x, k, s, pads, mode, kmax, pmax)


# Not Triton: each random geometry is a new specialisation of its kernels (sizes are compile-time), a compile each
# on a GPU and slow under the interpreter; the matrix tests above cover its geometry.
@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] != "triton"])
def test_random_geometry_runs_or_raises_value_error(target):
    """Random sizes (0 included), pads, filters, strides, modes and max kernels: each call either matches the
    float64 autograd of pad + conv (max_pool2d first for max-blur), values and gradient, or raises ValueError
    before any kernel runs, as the rules of ``_axis_is_valid`` say. fp64 on the CPU, fp32 on a GPU."""
    name, device = target
    dtype = torch.float64 if device == "cpu" else torch.float32
    rng = random.Random(20261206)
    ran = rejected = 0
    for _ in range(400):
        kind = rng.choice(["blur2d", "blur1d", "maxblur"])
        k, s, mode = rng.randint(1, 7), rng.randint(1, 4), rng.choice(geometry.PAD_MODES)
        kmax, pmax = rng.choice([(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]) if kind == "maxblur" else (1, 0)
        sizes = [rng.randint(0, 12) for _ in range(1 if kind == "blur1d" else 2)]
        pads = [rng.randint(0, 4) for _ in range(2 * len(sizes))]
        maps = [size + 2 * pmax - kmax + 1 for size in sizes]
        # max_pool2d refuses an empty input axis or max map: its windows would hold padding only
        valid = (kind != "maxblur" or min(sizes + maps) >= 1) and all(
            _axis_is_valid(size, pads[2 * a], pads[2 * a + 1], k, mode) for a, size in enumerate(reversed(maps))
        )
        x = torch.randn(2, 3, *sizes, dtype=torch.float64).to(device, dtype).requires_grad_()
        args = (kind, k, s, pads, mode, kmax, pmax)
        with ktkernels.use_backend(name):
            if not valid:
                with pytest.raises(ValueError):
                    _blur_family(x, *args)
                rejected += 1
                continue
            y = _blur_family(x, *args)
            grad = torch.randn_like(y)
            (gx,) = torch.autograd.grad(y, x, grad)
        x64 = x.detach().cpu().double().requires_grad_()
        maxed = torch.nn.functional.max_pool2d(x64, kmax, 1, pmax) if kind == "maxblur" else x64
        blur = ref.blur_pool1d_reference if kind == "blur1d" else ref.blur_pool2d_reference
        expected = blur(maxed, k, s, tuple(pads), mode)
        (expected_gx,) = torch.autograd.grad(expected, x64, grad.cpu().double())
        case = (sizes, *args)
        try:
            assert_close(y, expected, dtype)
            assert_close(gx, expected_gx, dtype)
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from None
        ran += 1
    assert ran > 150 and rejected > 50, (ran, rejected)  # both branches exercised


def test_backend_selection():
    assert backend.get_backend() in backend.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        ktkernels.set_backend("metal")
    before = backend.get_backend()
    with ktkernels.use_backend("torch"):
        assert backend.get_backend() == "torch"
        assert backend.resolve("blurpool", torch.device("cpu")) == "torch"
    assert backend.get_backend() == before
    # A named backend that cannot run never falls back silently.
    with ktkernels.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8))
    if not INTERPRET:
        with ktkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ktkernels.blur_pool2d(torch.randn(1, 1, 8, 8))
    assert backend.resolve("blurpool", torch.device("cpu")) == "cpu"


def test_backend_env_var():
    import subprocess
    import sys

    code = "import ktkernels; print(ktkernels.get_backend())"
    env = {**os.environ, "KTK_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def dense_r(axis: geometry.Axis) -> torch.Tensor:
    """R (out_size, size) in float64, from the forward table: what every other table must reproduce."""
    dense = torch.zeros(axis.out_size, axis.size, dtype=torch.float64)
    idx, w = geometry.forward_table(axis)
    for i in range(axis.out_size):
        for u in range(axis.filt_size):
            dense[i, idx[i, u]] += float(w[i, u])
    return dense


def test_adjoint_table_is_the_transpose():
    """R^T from the adjoint table equals the transpose of R from the forward table, densely."""
    for size, k, s, before, after, mode in [
        (9, 4, 2, 1, 2, "reflect"),
        (5, 7, 1, 3, 3, "replicate"),
        (6, 3, 3, 4, 0, "zero"),
    ]:
        axis = geometry.Axis(size, k, s, before, after, mode)
        dense = dense_r(axis)
        dense_t = torch.zeros(size, axis.out_size, dtype=torch.float64)
        idx, w = geometry.adjoint_table(axis)
        for p in range(size):
            for m in range(idx.shape[1]):
                dense_t[p, idx[p, m]] += float(w[p, m])
        assert torch.equal(dense_t, dense.T)


def random_axes(rng: random.Random, count: int):
    """Up to ``count`` valid random axes: every filter, stride and mode, pads up to k + 1 (reflect: < size)."""
    for _ in range(count):
        k, s, mode = rng.randint(1, 7), rng.randint(1, 4), rng.choice(geometry.PAD_MODES)
        before, after = rng.randint(0, k + 1), rng.randint(0, k + 1)
        size = rng.randint(max(1, k - before - after, before + 1 if mode == "reflect" else 1, after + 1), 15)
        if mode != "reflect" or max(before, after) < size:
            yield geometry.Axis(size, k, s, before, after, mode)


def test_banded_table_is_r_and_covers_the_owned_codes():
    """R from the bands equals R from the forward table, and each band covers the codes its output owns."""
    for axis in random_axes(random.Random(7), 200):
        size, s = axis.size, axis.stride
        banded = torch.zeros(axis.out_size, size, dtype=torch.float64)
        base, band = geometry.banded_table(axis)
        owned = geometry.codes_per_owner(size, axis.out_size, s)
        for i in range(axis.out_size):
            for d in range(band.shape[1]):
                if band[i, d] != 0:
                    banded[i, base[i] + d] += float(band[i, d])
            stop = min(s * i + (s if i < axis.out_size - 1 else owned), size)
            assert all(base[i] <= p < base[i] + band.shape[1] for p in range(s * i, stop)), (axis, i)
        assert torch.equal(banded, dense_r(axis)), axis


def test_window_table_is_r_on_the_stride_grid():
    """R[i, s*i + offset + d] = weight[d, i] and nothing else, for random axes (pads far from the anchors' too)."""
    for axis in random_axes(random.Random(13), 200):
        size, s = axis.size, axis.stride
        windowed = torch.zeros(axis.out_size, size, dtype=torch.float64)
        offset, weight = geometry.window_table(axis)
        assert weight.shape[1] == axis.out_size
        for i in range(axis.out_size):
            for d in range(weight.shape[0]):
                if weight[d, i] != 0:
                    assert 0 <= s * i + offset + d < size, (axis, i, d)
                    windowed[i, s * i + offset + d] += float(weight[d, i])
        assert torch.equal(windowed, dense_r(axis)), axis
    # Anchor pads on even sizes need no widening; odd sizes widen the reflect window by one.
    assert geometry.window_table(geometry.Axis(56, 4, 2, 1, 2, "reflect"))[1].shape == (4, 28)
    assert geometry.window_table(geometry.Axis(7, 4, 2, 1, 2, "reflect"))[1].shape == (5, 4)


def test_routing_table_reaches_every_window_slot():
    """weight[p, a, e] = R[base[p] + e, p - a + pmax] for every output e could name, and 0 elsewhere."""
    rng = random.Random(11)
    for _ in range(100):
        kmax = rng.randint(1, 3)
        pmax = rng.randint(0, kmax // 2)
        k, s, mode = rng.randint(1, 7), rng.randint(1, 4), rng.choice(("replicate", "zero"))
        size = rng.randint(max(1, k - 2), 12)
        axis = geometry.Axis(size, k, s, rng.randint(0, 2), rng.randint(0, 2), mode)
        if axis.out_size < 1:
            continue
        dense = dense_r(axis)
        base, weight = geometry.routing_table(axis, kmax, pmax)
        assert weight.shape[:2] == (size + kmax - 1 - 2 * pmax, kmax)
        for p in range(weight.shape[0]):
            for a in range(kmax):
                r = p - a + pmax
                expected = dense[:, r] if 0 <= r < size else torch.zeros(axis.out_size, dtype=torch.float64)
                got = torch.zeros(axis.out_size, dtype=torch.float64)
                for e in range(weight.shape[2]):
                    if base[p] + e < axis.out_size:
                        got[base[p] + e] = float(weight[p, a, e])
                assert torch.equal(got, expected), (axis, kmax, pmax, p, a)


def test_backward_saves_no_activations_and_compact_codes():
    """The blur saves nothing; the max-blur saves only uint8 codes (no max map, no int64 indices)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 3, 12, 10, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ktkernels.blur_pool2d(x).sum().backward()
        assert saved == []
        ktkernels.max_blur_pool2d(x).sum().backward()
    assert len(saved) == 1 and saved[0].dtype == torch.uint8
    assert saved[0].shape == (2, 3, 11, 9)  # one byte per max-map position


def test_torch_export_keeps_the_custom_ops():
    """torch.export traces through the fake impls and keeps one ktkernels op per layer."""
    model = torch.nn.Sequential(ktkernels.MaxBlurPool2d(3), ktkernels.BlurPool2d(3, pad_type="zero", filt_size=3))
    x = torch.randn(2, 3, 17, 16)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("ktkernels.max_blur_pool2d" in t for t in targets)
    assert any("ktkernels.blur_pool2d" in t for t in targets)
    assert torch.equal(exported.module()(x), model(x))
