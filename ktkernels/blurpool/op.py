"""torch.library ops of the blur-pool family: schema, validation, fake impl, autograd, dispatch.

Public ops (all in the ``ktkernels`` namespace):

- ``blur_pool2d(x, filt_size, stride, padding, pad_mode) -> y`` with padding (left, right, top, bottom)
- ``blur_pool1d(x, filt_size, stride, padding, pad_mode) -> y`` with padding (left, right)
- ``max_blur_pool2d(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode) -> (y, codes)``
- ``max_blur_pool2d_inference(...) -> y``: the same without the codes, for calls that need no gradient

and their ``*_backward`` ops. Backwards save no activations: the blur saves only sizes, the max-blur
its uint8 argmax codes (one byte per max-map position, not the max map or int64 indices). The backwards are
differentiable again: the blur's adjoint is the forward, and the max-blur's blurs the max map gathered with the
codes (``reference.max_map_gather``).

The functional API and the modules call :func:`blur` and :func:`max_blur`, which add what a custom op cannot
register: autocast (the anchors' blur is a conv, so it runs in the autocast dtype), forward-mode AD
(``torch.autograd.forward_ad``), torch.func's transforms (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``,
``hessian`` and ``vmap`` over them, through autograd.Functions of the same ops: ``ktkernels.autograd``), and the
max-blur op without codes when no derivative can come. torch's custom ops are differentiated in reverse mode only,
drop a forward-mode tangent without an error, and fail under torch.func.grad (pytorch/pytorch#170834), so the raw
ops do too.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from .. import backend, layout
from ..autograd import apply, functorch_differentiates, register, register_fold_vmap
from ..checks import check_int
from ..layout import channels_inner
from .geometry import (
    MAX_FILT_SIZE,
    MAX_STRIDE,
    PAD_MODES,
    Axis,
    binomial_taps,
    device_table,
    max_pool_output_size,
)
from .reference import (
    blur_pool1d_backward_reference,
    blur_pool1d_reference,
    blur_pool2d_backward_reference,
    blur_pool2d_reference,
    blur_pool_decomposed,
    max_blur_pool2d_backward_reference,
    max_blur_pool2d_reference,
    max_map_gather,
)

T = TypeVar("T")

FAMILY = "blurpool"
MAX_FAMILY = "maxblur"  # its own entry in backend.AUTO_CUDA_ORDER: the fastest backend differs
# A 1-pixel identity axis turns the 2-D gather into BlurPool1d over (N, C, 1, L).
_UNIT_AXIS = Axis(size=1, filt_size=1, stride=1, pad_before=0, pad_after=0, mode="zero")


# ----------------------------------------------------------------------------------------------
# Validation (runs in the fake impl too, so torch.compile reports bad input at trace time)


def check_input(x: Tensor, spatial_dims: int, op: str, what: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a Tensor, got {type(x).__name__}")
    layout = "(N, C, L)" if spatial_dims == 1 else "(N, C, H, W)"
    if x.dim() != 2 + spatial_dims:
        raise ValueError(f"{op} expects a {2 + spatial_dims}-D {what} {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op} expects a floating-point {what}, got {x.dtype}")


def check_blur_params(filt_size: int, stride: int, padding: list[int]) -> tuple[int, int, list[int]]:
    """Types and ranges that need no input; the values as ints."""
    filt_size = check_int("filt_size", filt_size, 1, MAX_FILT_SIZE)
    stride = check_int("stride", stride, 1, MAX_STRIDE)
    return filt_size, stride, [check_int("each pad", p, 0) for p in padding]


def check_blur_args(sizes: tuple, filt_size: int, stride: int, padding: list[int], pad_mode: str, op: str) -> None:
    """Validate filter, stride, pads (before/after per axis, last axis first) and mode against sizes."""
    check_blur_params(filt_size, stride, padding)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if len(padding) != 2 * len(sizes):
        raise ValueError(f"{op} expects {2 * len(sizes)} pads, got {list(padding)}")
    for axis in _spatial_axes(sizes, filt_size, stride, padding, pad_mode):
        pads = (axis.pad_before, axis.pad_after)
        if pad_mode != "zero" and axis.size < 1:
            # Nothing to reflect or replicate (F.pad refuses it too); zero padding of an empty axis is all zeros.
            raise ValueError(f"{op}: {pad_mode} padding needs non-empty spatial sizes, got sizes {tuple(sizes)}")
        if pad_mode == "reflect" and max(pads) >= axis.size:
            raise ValueError(
                f"{op}: reflect padding needs each pad < the input size, got pads {pads} for size {axis.size}"
            )
        if axis.out_size < 1:
            raise ValueError(f"{op}: input size {axis.size} with pads {pads} is smaller than filt_size {filt_size}")


def check_max(kmax: int, pmax: int) -> tuple[int, int]:
    """(max_kernel, max_padding) as ints: 1..3 and 0..max_kernel // 2."""
    kmax = check_int("max_kernel", kmax, 1, 3)
    return kmax, check_int("max_padding", pmax, 0, kmax // 2)


def max_map_sizes(sizes: tuple, kmax: int, pmax: int) -> tuple[int, int]:
    """(H_m, W_m) of the stride-1 max map of an (H, W) input. ValueError where max_pool2d refuses the input:
    an empty max map, or an empty input axis (its windows would hold padding only)."""
    maps = tuple(max_pool_output_size(size, kmax, pmax) for size in sizes)
    if min(maps) < 1 or min(sizes) < 1:
        raise ValueError(
            f"max_blur_pool2d: max_pool2d(kernel {kmax}, stride 1, padding {pmax}) needs spatial sizes >= "
            f"{max(kmax - 2 * pmax, 1)}, got {tuple(sizes)}"
        )
    return maps


def _spatial_axes(sizes: tuple, filt_size: int, stride: int, padding: list[int], pad_mode: str) -> list[Axis]:
    """One Axis per spatial dim, in dim order; ``padding`` lists the last dim first, as F.pad does."""
    return [
        Axis(size, filt_size, stride, padding[2 * a], padding[2 * a + 1], pad_mode)
        for a, size in enumerate(reversed(sizes))
    ][::-1]


def blur_axes(sizes: tuple, filt_size: int, stride: int, padding: list[int], pad_mode: str) -> tuple[Axis, Axis]:
    """(row axis, column axis) of the gather; padding lists the last axis first, as F.pad does.

    A 1-D op gets an identity row axis and runs the 2-D gather over an (N, C, 1, L) view.
    """
    axes = _spatial_axes(sizes, filt_size, stride, padding, pad_mode)
    return (_UNIT_AXIS, axes[0]) if len(axes) == 1 else (axes[0], axes[1])


@functools.lru_cache(maxsize=4096)
def _cached_plan(sizes: tuple, filt_size: int, stride: int, padding: tuple, pad_mode: str, op: str) -> tuple:
    check_blur_args(sizes, filt_size, stride, list(padding), pad_mode, op)
    return blur_axes(sizes, filt_size, stride, padding, pad_mode)


def _all_ints(*values) -> bool:
    return all(type(v) is int for v in values)


def blur_plan(sizes: tuple, filt_size: int, stride: int, padding: list[int], pad_mode: str, op: str) -> tuple:
    """Validated (row axis, column axis) for these sizes, cached: training calls repeat the same few shapes.

    Symbolic sizes (torch.compile tracing) are validated every time and never cached.
    """
    if _all_ints(*sizes, filt_size, stride, *padding):
        return _cached_plan(tuple(sizes), filt_size, stride, tuple(padding), pad_mode, op)
    check_blur_args(sizes, filt_size, stride, padding, pad_mode, op)
    return blur_axes(sizes, filt_size, stride, padding, pad_mode)


def _check_grad_sizes(op: str, grad_shape: tuple, expected: tuple, input_size: tuple) -> None:
    if tuple(grad_shape[2:]) != tuple(expected):
        raise ValueError(
            f"{op}: grad has shape {tuple(grad_shape)}, but an input of spatial size {tuple(input_size)} gives "
            f"outputs of spatial size {tuple(expected)}"
        )


def _check_input_size(op: str, input_size: tuple, spatial_dims: int) -> None:
    if len(input_size) != spatial_dims:
        raise ValueError(f"{op} expects {spatial_dims} input sizes, got {list(input_size)}")
    for size in input_size:
        if type(size) is int:
            check_int("each input size", size, 0)


def _blur_backward_axes(
    op: str, name: str, grad_shape: tuple, input_size: tuple, filt_size: int, stride: int, padding: tuple, pad_mode: str
) -> tuple:
    spatial = len(grad_shape) - 2
    _check_input_size(op, input_size, spatial)
    axes = blur_plan(input_size, filt_size, stride, padding, pad_mode, name)
    _check_grad_sizes(op, grad_shape, tuple(axis.out_size for axis in axes[2 - spatial :]), input_size)
    return axes


def _max_blur_backward_axes(
    grad_shape: tuple,
    codes_shape: tuple,
    input_size: tuple,
    max_kernel: int,
    max_padding: int,
    filt_size: int,
    stride: int,
    padding: tuple,
    pad_mode: str,
) -> tuple:
    op = "max_blur_pool2d_backward"
    _check_input_size(op, input_size, 2)
    max_kernel, max_padding = check_max(max_kernel, max_padding)
    hm, wm = max_map_sizes(input_size, max_kernel, max_padding)
    if tuple(codes_shape) != (grad_shape[0], grad_shape[1], hm, wm):
        raise ValueError(
            f"{op}: codes have shape {tuple(codes_shape)}, but grad of shape {tuple(grad_shape)} and an input of "
            f"spatial size {tuple(input_size)} need codes of shape {(grad_shape[0], grad_shape[1], hm, wm)}"
        )
    axes = blur_plan((hm, wm), filt_size, stride, padding, pad_mode, "max_blur_pool2d")
    _check_grad_sizes(op, grad_shape, (axes[0].out_size, axes[1].out_size), input_size)
    return axes


_cached_blur_backward_axes = functools.lru_cache(maxsize=1024)(_blur_backward_axes)
_cached_max_blur_backward_axes = functools.lru_cache(maxsize=1024)(_max_blur_backward_axes)


def blur_backward_plan(
    name: str,
    spatial_dims: int,
    grad: Tensor,
    input_size: list[int],
    filt_size: int,
    stride: int,
    padding: list[int],
    pad_mode: str,
) -> tuple:
    """The validated axes of ``{name}_backward``, as :func:`blur_plan` gives them. The backward ops are public, so
    ``grad`` must be the output gradient of a forward on an input of ``input_size``: ValueError/TypeError naming
    the values otherwise, before any kernel runs (the kernels would read past ``grad``). Cached like blur_plan."""
    op = f"{name}_backward"
    check_input(grad, spatial_dims, op, "grad")
    args = (op, name, tuple(grad.shape), tuple(input_size), filt_size, stride, tuple(padding), pad_mode)
    if _all_ints(*grad.shape, *input_size, *padding, filt_size, stride):
        return _cached_blur_backward_axes(*args)
    return _blur_backward_axes(*args)


def max_blur_backward_plan(
    grad: Tensor,
    codes: Tensor,
    input_size: list[int],
    max_kernel: int,
    max_padding: int,
    filt_size: int,
    stride: int,
    padding: list[int],
    pad_mode: str,
) -> tuple:
    """:func:`blur_backward_plan` for ``max_blur_pool2d_backward``: also the argmax ``codes`` (uint8, on grad's
    device, of the max map's shape) must be those of that forward."""
    op = "max_blur_pool2d_backward"
    check_input(grad, 2, op, "grad")
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        kind = f"a {codes.dtype} tensor" if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"{op} expects uint8 argmax codes (max_blur_pool2d's second output), got {kind}")
    if codes.device != grad.device:
        raise ValueError(f"{op}: codes are on {codes.device} but grad is on {grad.device}")
    sizes = (tuple(grad.shape), tuple(codes.shape), tuple(input_size))
    args = (*sizes, max_kernel, max_padding, filt_size, stride, tuple(padding), pad_mode)
    if _all_ints(*grad.shape, *codes.shape, *input_size, *padding, max_kernel, max_padding, filt_size, stride):
        return _cached_max_blur_backward_axes(*args)
    return _max_blur_backward_axes(*args)


def _as4d(t: Tensor) -> Tensor:
    return t if t.dim() == 4 else t.unsqueeze(2)


def _tables(axes: tuple[Axis, Axis], adjoint: bool, device: torch.device) -> tuple:
    return tuple(device_table("adjoint" if adjoint else "forward", axis, device) for axis in axes)


# ----------------------------------------------------------------------------------------------
# Kernel dispatch


def _gather(name: str, x: Tensor, axes: tuple[Axis, Axis], adjoint: bool, out: Tensor) -> None:
    x, out = _as4d(x), _as4d(out)
    if name == "triton":
        from . import triton as kernels

        backend.check_triton_span("blur_pool", x, out)
        with backend.triton_device(x):
            kernels.blur(x, axes, adjoint, out)
    else:
        rows, cols = _tables(axes, adjoint, x.device)
        torch.ops.ktkernels_C.blur_gather_(x, *rows, *cols, out)


# ----------------------------------------------------------------------------------------------
# blur_pool2d / blur_pool1d: one definition, two ops


def _define_blur(spatial: int):
    """Define ``ktkernels::blur_pool{spatial}d`` and its backward op, with fake impls and autograd."""
    name = f"blur_pool{spatial}d"
    reference = {1: blur_pool1d_reference, 2: blur_pool2d_reference}[spatial]
    reference_backward = {1: blur_pool1d_backward_reference, 2: blur_pool2d_backward_reference}[spatial]

    def allocate(x, filt_size, stride, padding, pad_mode):
        check_input(x, spatial, name)
        axes = blur_plan(tuple(x.shape[2:]), filt_size, stride, padding, pad_mode, name)
        out_sizes = (axis.out_size for axis in axes[2 - spatial :])
        return axes, layout.alloc(x, (*x.shape[:2], *out_sizes), channels_inner(x))

    def forward_fake(x, filt_size, stride, padding, pad_mode):
        return allocate(x, filt_size, stride, padding, pad_mode)[1]

    def forward(x: Tensor, filt_size: int, stride: int, padding: list[int], pad_mode: str) -> Tensor:
        axes, y = allocate(x, filt_size, stride, padding, pad_mode)
        if y.numel() == 0:
            return y
        if x.numel() == 0:  # an empty spatial axis, zero-padded: every window holds only padding
            return y.zero_()
        backend_name = backend.resolve(FAMILY, x.device, channels_inner(x))
        if backend_name == "torch":
            y.copy_(reference(x, filt_size, stride, tuple(padding), pad_mode))
        else:
            _gather(backend_name, x, axes, False, y)
        return y

    def backward_allocate(grad, input_size, filt_size, stride, padding, pad_mode, channels_last):
        axes = blur_backward_plan(name, spatial, grad, input_size, filt_size, stride, padding, pad_mode)
        return axes, layout.alloc(grad, (*grad.shape[:2], *input_size), channels_last)

    def backward_fake(grad, input_size, filt_size, stride, padding, pad_mode, channels_last):
        return backward_allocate(grad, input_size, filt_size, stride, padding, pad_mode, channels_last)[1]

    def backward(
        grad: Tensor,
        input_size: list[int],
        filt_size: int,
        stride: int,
        padding: list[int],
        pad_mode: str,
        channels_last: bool,
    ) -> Tensor:
        axes, gx = backward_allocate(grad, input_size, filt_size, stride, padding, pad_mode, channels_last)
        if gx.numel() == 0:
            return gx
        if grad.numel() == 0:
            return gx.zero_()
        backend_name = backend.resolve(FAMILY, grad.device, channels_last)
        if backend_name == "torch":
            args = (filt_size, stride, tuple(padding), pad_mode)
            gx.copy_(reference_backward(grad, tuple(input_size) if spatial == 2 else input_size[0], *args))
        else:
            _gather(backend_name, grad, axes, True, gx)
        return gx

    forward.__doc__ = f"Blur pool over the last {spatial} dim(s) of (N, C, ...); padding lists the last axis first."
    backward.__doc__ = f"Gradient of {name} w.r.t. its input: the gather over the adjoint tables."
    forward_op = torch.library.custom_op(f"ktkernels::{name}", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"ktkernels::{name}_backward", backward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op.register_fake(backward_fake)

    def forward_setup(ctx, inputs, output):
        x, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode = inputs
        ctx.input_size = list(x.shape[2:])
        ctx.channels_last = channels_inner(x)

    def backward_setup(ctx, inputs, output):
        _, ctx.input_size, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode, ctx.channels_last = inputs

    # Both ops are linear in their tensor and each other's adjoint: every derivative is one of the two ops.
    def blur_of(ctx, t: Tensor) -> Tensor:
        return apply(forward_op, t, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode)

    def adjoint_of(ctx, t: Tensor) -> Tensor:
        args = (ctx.input_size, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode, ctx.channels_last)
        return apply(backward_op, t, *args)

    def forward_grad(ctx, grad):
        return linear(lambda g: adjoint_of(ctx, g), grad), None, None, None, None

    def backward_grad(ctx, grad_grad):
        return linear(lambda g: blur_of(ctx, g), grad_grad), *([None] * 6)

    # Autograd, and its autograd.Function for torch.func (ktkernels.autograd): both ops are linear, each its own jvp
    register(forward_op, name, forward_setup, forward_grad, lambda ctx, x_t, *_: blur_of(ctx, x_t))
    register(backward_op, f"{name}_backward", backward_setup, backward_grad, lambda ctx, g_t, *_: adjoint_of(ctx, g_t))
    return forward_op, backward_op


blur_pool2d, blur_pool2d_backward = _define_blur(2)
blur_pool1d, blur_pool1d_backward = _define_blur(1)


# ----------------------------------------------------------------------------------------------
# max_blur_pool2d: max_pool2d(max_kernel, stride=1, max_padding) then the blur pool, in one kernel


def _max_blur_forward(x: Tensor, max_kernel: int, max_padding: int, filt_size: int, stride: int, padding: list[int],
                      pad_mode: str, y: Tensor, codes: Tensor | None) -> None:  # fmt: skip
    """Fill ``y`` (and ``codes``, unless None: then no backend forms them) on the chosen backend."""
    if y.numel() == 0:
        return
    name = backend.resolve(MAX_FAMILY, x.device, channels_inner(x))
    if name == "torch":
        ref_y, ref_codes = max_blur_pool2d_reference(
            x, max_kernel, max_padding, filt_size, stride, tuple(padding), pad_mode
        )
        y.copy_(ref_y)
        if codes is not None:
            codes.copy_(ref_codes)
        return
    sizes = max_map_sizes(tuple(x.shape[2:]), max_kernel, max_padding)
    axes = blur_plan(sizes, filt_size, stride, padding, pad_mode, "max_blur_pool2d")
    if name == "triton":
        from . import triton as kernels

        backend.check_triton_span("max_blur_pool2d", x, y, *([] if codes is None else [codes]))
        with backend.triton_device(x):
            kernels.max_blur_forward(x, max_kernel, max_padding, axes, y, codes)
    else:
        rows, cols = _tables(axes, False, x.device)
        torch.ops.ktkernels_C.max_blur_forward_(x, max_kernel, max_padding, stride, stride, *rows, *cols, y, codes)


@torch.library.custom_op("ktkernels::max_blur_pool2d", mutates_args=())
def max_blur_pool2d(
    x: Tensor, max_kernel: int, max_padding: int, filt_size: int, stride: int, padding: list[int], pad_mode: str
) -> tuple[Tensor, Tensor]:
    """Fused max pool (stride 1) + blur pool of (N, C, H, W). Returns (y, uint8 argmax codes)."""
    y, codes = _max_blur_pool2d_fake(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)
    _max_blur_forward(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode, y, codes)
    return y, codes


@max_blur_pool2d.register_fake
def _max_blur_pool2d_fake(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode):
    y = _max_blur_pool2d_inference_fake(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)
    hm, wm = max_map_sizes(tuple(x.shape[2:]), max_kernel, max_padding)
    return y, layout.alloc(x, (x.shape[0], x.shape[1], hm, wm), channels_inner(x), dtype=torch.uint8)


@torch.library.custom_op("ktkernels::max_blur_pool2d_inference", mutates_args=())
def max_blur_pool2d_inference(
    x: Tensor, max_kernel: int, max_padding: int, filt_size: int, stride: int, padding: list[int], pad_mode: str
) -> Tensor:
    """``max_blur_pool2d``'s output alone, for calls with no backward to come: no backend forms or writes the
    argmax codes (a third of the forward's bytes in bf16, and the argmax's registers and instructions). It has
    no autograd; :func:`max_blur` takes it when no gradient is needed."""
    y = _max_blur_pool2d_inference_fake(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)
    _max_blur_forward(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode, y, None)
    return y


def max_blur_output_size(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode) -> tuple[int, int, int, int]:
    """The (N, C, H_out, W_out) of ``max_blur_pool2d(x, ...)``, with every argument validated against ``x``."""
    check_input(x, 2, "max_blur_pool2d")
    check_max(max_kernel, max_padding)
    n, c, h, w = x.shape
    hm, wm = max_map_sizes((h, w), max_kernel, max_padding)
    rows, cols = blur_plan((hm, wm), filt_size, stride, padding, pad_mode, "max_blur_pool2d")
    return n, c, rows.out_size, cols.out_size


@max_blur_pool2d_inference.register_fake
def _max_blur_pool2d_inference_fake(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode):
    size = max_blur_output_size(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)
    return layout.alloc(x, size, channels_inner(x))


@torch.library.custom_op("ktkernels::max_blur_pool2d_backward", mutates_args=())
def max_blur_pool2d_backward(
    grad: Tensor,
    codes: Tensor,
    input_size: list[int],
    max_kernel: int,
    max_padding: int,
    filt_size: int,
    stride: int,
    padding: list[int],
    pad_mode: str,
    channels_last: bool,
) -> Tensor:
    """Gradient of max_blur_pool2d w.r.t. its input, from the output gradient and the argmax codes."""
    axes, gx = _max_blur_backward_allocate(
        grad, codes, input_size, max_kernel, max_padding, filt_size, stride, padding, pad_mode, channels_last
    )
    if gx.numel() == 0:
        return gx
    if grad.numel() == 0:
        return gx.zero_()
    name = backend.resolve(MAX_FAMILY, grad.device, channels_last)
    if name == "torch":
        gx.copy_(
            max_blur_pool2d_backward_reference(
                grad, codes, tuple(input_size), max_kernel, max_padding, filt_size, stride, tuple(padding), pad_mode
            )
        )
        return gx
    if name == "triton":
        from . import triton as kernels

        backend.check_triton_span("max_blur_pool2d_backward", grad, codes, gx)
        if not channels_inner(grad) and codes.stride(3) != 1:
            # The planar kernel loads code rows as unit-stride groups, as the forward writes them; codes a user
            # stored otherwise are copied to that layout.
            codes = codes.contiguous()
        with backend.triton_device(grad):
            kernels.max_blur_backward(grad, codes, max_kernel, max_padding, axes, gx)
    else:
        rows, cols = _tables(axes, True, grad.device)
        torch.ops.ktkernels_C.max_blur_backward_(grad, codes, max_kernel, max_padding, *rows, *cols, gx)
    return gx


@max_blur_pool2d_backward.register_fake
def _max_blur_pool2d_backward_fake(
    grad, codes, input_size, max_kernel, max_padding, filt_size, stride, padding, pad_mode, channels_last
):
    return _max_blur_backward_allocate(
        grad, codes, input_size, max_kernel, max_padding, filt_size, stride, padding, pad_mode, channels_last
    )[1]


def _max_blur_backward_allocate(
    grad, codes, input_size, max_kernel, max_padding, filt_size, stride, padding, pad_mode, channels_last
):
    """(validated axes, the uninitialised input gradient), for the real and the fake impl."""
    axes = max_blur_backward_plan(
        grad, codes, input_size, max_kernel, max_padding, filt_size, stride, padding, pad_mode
    )
    return axes, layout.alloc(grad, (grad.shape[0], grad.shape[1], *input_size), channels_last)


def _max_blur_pool2d_setup(ctx, inputs, output):
    x, ctx.max_kernel, ctx.max_padding, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode = inputs
    ctx.save_for_backward(output[1])
    ctx.input_size = list(x.shape[2:])
    ctx.channels_last = channels_inner(x)
    # The codes never have a gradient; without this autograd would hand the backward a zero uint8 tensor of their
    # size (the max map's) on every call: a 101 MB memset at ResNet-50's stem, batch 128.
    ctx.set_materialize_grads(False)


def _max_blur_backward_setup(ctx, inputs, output):
    _, codes, ctx.input_size, ctx.max_kernel, ctx.max_padding, ctx.filt_size, ctx.stride, ctx.padding = inputs[:8]
    ctx.pad_mode, ctx.channels_last = inputs[8:]
    ctx.save_for_backward(codes)


# With the codes fixed, the backward is linear in the output gradient: gx = S B^T g, where B^T is the blur's adjoint
# and S scatters the max map to the picked elements. Its adjoint B G gathers with the codes (G = S^T,
# reference.max_map_gather) and blurs: the max-blur's double backward, and the forward's tangent B G x_t.
def _blur_of_picked(ctx, t: Tensor) -> Tensor:
    (codes,) = ctx.saved_tensors
    picked = max_map_gather(t, codes, ctx.max_kernel, ctx.max_padding)
    return apply(blur_pool2d, picked, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode)


def _max_blur_adjoint(ctx, t: Tensor) -> Tensor:
    (codes,) = ctx.saved_tensors
    args = (ctx.input_size, ctx.max_kernel, ctx.max_padding, ctx.filt_size, ctx.stride, ctx.padding, ctx.pad_mode)
    return apply(max_blur_pool2d_backward, t, codes, *args, ctx.channels_last)


def _max_blur_pool2d_grad(ctx, grad, _grad_codes):
    if grad is None:  # only the codes were used, and they have no gradient
        return None, None, None, None, None, None, None
    return linear(lambda g: _max_blur_adjoint(ctx, g), grad), None, None, None, None, None, None


def _max_blur_backward_grad(ctx, grad_grad):
    return linear(lambda g: _blur_of_picked(ctx, g), grad_grad), *([None] * 9)


register(
    max_blur_pool2d_backward,
    "max_blur_pool2d_backward",
    _max_blur_backward_setup,
    _max_blur_backward_grad,
    lambda ctx, g_t, *_: _max_blur_adjoint(ctx, g_t),
    forward_saves=lambda inputs, output: inputs[1:2],
)
register(
    max_blur_pool2d,
    "max_blur_pool2d",
    _max_blur_pool2d_setup,
    _max_blur_pool2d_grad,
    lambda ctx, x_t, *_: (_blur_of_picked(ctx, x_t), None),
    forward_saves=lambda inputs, output: output[1:],
)


# ----------------------------------------------------------------------------------------------
# vmap: every tensor of these ops is (N, C, ...) and each (n, c) plane is independent, so a vmapped dimension
# folds into N (torch would otherwise loop over it, one op call per element, with a warning).


register_fold_vmap(blur_pool2d, blur_pool2d_backward, blur_pool1d, blur_pool1d_backward, max_blur_pool2d,
                   max_blur_pool2d_inference, max_blur_pool2d_backward)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Entry points of the functional API and the modules: autocast and forward-mode AD around the ops


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype where autocast is on, as ``F.conv2d`` casts it (every floating dtype but fp64):
    the anchors' blur is a conv, so their layers return the autocast dtype, and so do these."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        if x.dtype not in (dtype, torch.float64):
            return x.to(dtype)
    return x


def _tangent(x: Tensor) -> Tensor | None:
    """``x``'s ``torch.autograd.forward_ad`` tangent at the current level, or None. Outside any dual level torch
    keeps ``_current_level`` at -1, so the common case costs two checks. torch.func's tangents are not looked at
    here: its jvp levels take the ops' autograd.Functions, whose jvp carries them (:func:`_apply`)."""
    if torch.compiler.is_compiling() or fwAD._current_level < 0 or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    return fwAD.unpack_dual(x).tangent


def linear(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` for an op linear in ``x``, with ``x``'s forward-mode tangent carried through the same op."""
    tangent = _tangent(x)
    if tangent is None:
        return fn(x)
    return fwAD.make_dual(fn(fwAD.unpack_dual(x).primal), fn(tangent))


def _exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing: ONNX runtimes do not know the ktkernels ops, so
    the entry points then emit what :func:`ktkernels.export_onnx` does, ``Pad`` + ``Conv(group=C)`` (+ ``MaxPool``).
    """
    # Either exporter traces (the legacy one with torch.jit.trace, the torch.export-based one as torch.export), and
    # the two cheap flags spare eager calls the exporter's (about 1 us).
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def fixed_in_trace(fn: Callable[..., T], *args) -> T:
    """``fn(*args)``. Under ``torch.jit.trace`` (the TorchScript-based ONNX exporter traces with it) without the
    tracer's warnings that the checks on sizes and the constant filter are fixed in the trace: they are meant to be."""
    if not torch.jit.is_tracing():
        return fn(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args)


def _blur_for_onnx(
    x: Tensor, spatial_dims: int, filt_size: int, stride: int, padding: list[int], pad_mode: str
) -> Tensor:
    """The op's checks, then pad + depthwise conv: what an exporter writes as ``Pad`` + ``Conv(group=C)``."""
    name = f"blur_pool{spatial_dims}d"
    check_input(x, spatial_dims, name)
    blur_plan(tuple(x.shape[2:]), filt_size, stride, padding, pad_mode, name)  # the op's ValueErrors
    taps = binomial_taps(filt_size)
    return blur_pool_decomposed(autocast_input(x), taps, [stride] * spatial_dims, padding, pad_mode, spatial_dims)


def blur(x: Tensor, spatial_dims: int, filt_size: int, stride: int, padding: list[int], pad_mode: str) -> Tensor:
    """``blur_pool2d`` (``spatial_dims`` 2) or ``blur_pool1d`` (1) of ``x``."""
    forward_op = blur_pool1d if spatial_dims == 1 else blur_pool2d
    if not isinstance(x, Tensor):
        return forward_op(x, filt_size, stride, padding, pad_mode)  # its TypeError
    if _exporting_onnx():
        return fixed_in_trace(_blur_for_onnx, x, spatial_dims, filt_size, stride, padding, pad_mode)
    return linear(lambda t: apply(forward_op, t, filt_size, stride, padding, pad_mode), autocast_input(x))


def _derivative_can_come(x: Tensor) -> bool:
    """Whether a derivative through ``x`` may be asked for, so that the max-blur must form its codes: grad mode on and
    ``x`` requiring grad, or a tensor that torch.func wraps. Those do not show the requires_grad of the tensor under
    them, so with grad mode on they count as yes; a jvp or grad level needs the codes even under no_grad.

    ``torch.jit.trace`` records the codes form whatever the grad mode: its check traces again under no_grad and
    needs the same graph, and a traced graph may be trained."""
    if torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.is_grad_enabled() and x.requires_grad
    return torch.is_grad_enabled() or functorch_differentiates(x)


def max_blur(
    x: Tensor, max_kernel: int, max_padding: int, filt_size: int, stride: int, padding: list[int], pad_mode: str
) -> Tensor:
    """``max_blur_pool2d``'s output. Where no derivative can come it runs ``max_blur_pool2d_inference`` (no argmax
    codes); with a ``torch.autograd.forward_ad`` tangent or under ``torch.onnx.export``, ``max_pool2d`` (which
    carries the tangent along its argmax) and then the blur: the same values, unfused. (torch.func's tangents go
    through the op's autograd.Function.)"""
    if not isinstance(x, Tensor):
        return max_blur_pool2d(x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)[0]  # its TypeError
    x = autocast_input(x)
    if _tangent(x) is None and not _exporting_onnx():
        args = (max_kernel, max_padding, filt_size, stride, padding, pad_mode)
        if _derivative_can_come(x):
            return apply(max_blur_pool2d, x, *args)[0]
        return max_blur_pool2d_inference(x, *args)  # no argmax codes
    fixed_in_trace(max_blur_output_size, x, max_kernel, max_padding, filt_size, stride, padding, pad_mode)  # checks
    return blur(F.max_pool2d(x, max_kernel, 1, max_padding), 2, filt_size, stride, padding, pad_mode)
