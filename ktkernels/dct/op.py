"""torch.library ops of the DCT family: validation, fake impls, autograd, dispatch to the backends.

- ``ktkernels::dct_transform(x, kind, norm, out_size, adjoint) -> y``: the separable basis product over the
  last ``len(out_size)`` (1 or 2) dims. ``adjoint=False`` applies the first ``out_size`` rows of the
  ``kind`` matrix on each axis (a DCT, optionally keeping only the low-frequency block); ``adjoint=True``
  applies their transpose and restores ``out_size``. Each is the other's gradient, so derivatives of any
  order work.
- ``ktkernels::channel_power_mean(x, p) -> (N, H, W)``: ``mean_c |x|^p`` in one pass over x, and its
  backward ``ktkernels::channel_power_mean_backward``: one elementwise pass.

The functional API calls them through ``ktkernels.autograd.apply``: under torch.func and forward-mode AD they run
as autograd.Functions with the same formulas, a jvp each and vmap rules (the bare custom ops would fail or drop
the tangent).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend, layout
from ..autograd import apply, register, register_fold_vmap
from ..checks import is_real
from ..layout import channels_inner
from .basis import KINDS, NORMS, device_matrix
from .reference import (
    channel_power_mean_backward_reference,
    channel_power_mean_reference,
    transform_reference,
)

FAMILY = "dct"
# Largest map side the Triton kernel takes: it holds a whole padded plane per program on chip, and at 64 x 64 its sm_90
# build already spills (benchmarks/results/codegen_sm90.md); a 224 x 224 plane (a 256 x 256 tile) would not fit.
TRITON_MAX_SIDE = 64


def check_input(x: Tensor, dims: int, op: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a Tensor, got {type(x).__name__}")
    if x.dim() < dims:
        raise ValueError(f"{op} transforms the last {dims} dim(s): needs a tensor of rank >= {dims}, got {x.dim()}")
    if not x.is_floating_point():
        raise TypeError(f"{op} expects a floating-point input, got {x.dtype}")


def check_sizes(sizes: list[int], out_size: list[int], adjoint: bool, op: str) -> None:
    """Forward: 1 <= out <= size on each axis (keep may not exceed the size); adjoint: size <= out."""
    for size, out in zip(sizes, out_size, strict=True):
        if isinstance(out, bool) or not isinstance(out, (int, torch.SymInt)) or out < 1:
            raise ValueError(f"{op}: sizes must be ints >= 1, got {list(out_size)}")
        if adjoint and size > out:
            raise ValueError(f"{op}: the adjoint input {list(sizes)} exceeds its output size {list(out_size)}")
        if not adjoint and out > size:
            raise ValueError(f"{op}: keep {list(out_size)} exceeds the transformed size {list(sizes)}")
        if size < 1:
            raise ValueError(f"{op}: transformed dims must be >= 1, got {list(sizes)}")


def _as_maps(x: Tensor, dims: int) -> Tensor:
    """A 4-D (N, C, H, W) view (or, for rank > 4 with unmergeable strides, a copy) whose H, W are the transformed
    dims; a 1-D transform gets H = 1. channels_last (N, C, H, W) stays a strided view: read without a copy."""
    if dims == 1:
        x = x.unsqueeze(-2)
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    if x.dim() == 4:
        return x
    return x.flatten(0, -4)  # not reshape(-1, ...): that cannot infer -1 when a dim is 0


def _alloc_like_maps(x: Tensor, maps: Tensor, dims: int, out_size: list[int]) -> tuple[Tensor, Tensor]:
    """(output in x's shape convention, its 4-D maps view); the output keeps a channels_last input's layout."""
    spatial = [1, *out_size] if dims == 1 else list(out_size)
    out_maps = layout.alloc(maps, (*maps.shape[:2], *spatial), channels_inner(maps))
    out = out_maps.view(*x.shape[:-dims], *out_size) if x.dim() != 4 or dims != 2 else out_maps
    return out, out_maps


def _resolve(x: Tensor) -> str:
    return backend.resolve_for(FAMILY, x, triton_fp64=False)


@torch.library.custom_op("ktkernels::dct_transform", mutates_args=())
def dct_transform(x: Tensor, kind: str, norm: str, out_size: list[int], adjoint: bool) -> Tensor:
    """The separable DCT basis product over the last ``len(out_size)`` dims (see the module docstring)."""
    out, out_maps = _allocate(x, kind, norm, out_size, adjoint)
    if out.numel() == 0:
        return out
    name = _resolve(x)
    dims = len(out_size)
    maps = _as_maps(x, dims)
    if name == "triton" and max(*maps.shape[2:], *out_maps.shape[2:]) > TRITON_MAX_SIDE:
        name = "torch"  # the Triton kernel holds whole planes on chip; larger maps are two GEMMs (cuBLAS)
    if name == "torch":
        out.copy_(transform_reference(x, kind, norm, list(out_size), adjoint))
        return out
    basis_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mats = []
    for size, out_len in zip(maps.shape[4 - dims :], out_size, strict=True):
        n, rows = (out_len, size) if adjoint else (size, out_len)
        mats.append(device_matrix(kind, n, norm, rows, adjoint, basis_dtype, x.device))
    if dims == 1:
        mats.insert(0, torch.ones((1, 1), dtype=basis_dtype, device=x.device))
    if name == "triton":
        from . import triton as kernels

        backend.check_triton_span("dct", maps, out_maps)
        with backend.triton_device(maps):
            kernels.basis2d(maps, mats[0], mats[1], out_maps)
    else:
        torch.ops.ktkernels_C.dct_basis2d_(maps, mats[0], mats[1], out_maps)
    return out


def _allocate(x: Tensor, kind: str, norm: str, out_size: list[int], adjoint: bool) -> tuple[Tensor, Tensor]:
    """Validate, then allocate (the output, its 4-D maps view)."""
    dims = len(out_size)
    check_input(x, dims, "dct_transform")
    if kind not in KINDS or norm not in NORMS or dims not in (1, 2):
        raise ValueError(f"dct_transform: kind {kind!r}, norm {norm!r}, {dims} dims are not supported")
    check_sizes(list(x.shape[-dims:]), list(out_size), adjoint, "dct_transform")
    return _alloc_like_maps(x, _as_maps(x, dims), dims, list(out_size))


@dct_transform.register_fake
def _dct_transform_fake(x, kind, norm, out_size, adjoint):
    return _allocate(x, kind, norm, out_size, adjoint)[0]


def _dct_transform_setup(ctx, inputs, output):
    x, ctx.kind, ctx.norm, ctx.out_size, ctx.adjoint = inputs
    ctx.in_size = list(x.shape[-len(ctx.out_size) :])


def _dct_transform_grad(ctx, grad):
    return apply(dct_transform, grad, ctx.kind, ctx.norm, ctx.in_size, not ctx.adjoint), None, None, None, None


def _dct_transform_jvp(ctx, x_t, *_):  # linear in x
    return apply(dct_transform, x_t, ctx.kind, ctx.norm, ctx.out_size, ctx.adjoint)


def _leading_batch_vmap(call, info, in_dims, x, *args):
    """The op takes any leading dims: the vmapped dim moves to the front."""
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
    return call(x, *args), 0


def _dct_transform_vmap(info, in_dims, *args):
    return _leading_batch_vmap(dct_transform, info, in_dims, *args)


torch.library.register_vmap(dct_transform, _dct_transform_vmap)
# Autograd, and its autograd.Function for torch.func (ktkernels.autograd): linear, so the op is its own jvp
register(
    dct_transform, "dct_transform", _dct_transform_setup, _dct_transform_grad, _dct_transform_jvp, _leading_batch_vmap
)


# ----------------------------------------------------------------------------------------------
# The channel reduction of the DCT attention map


def check_power(x: Tensor, p: float, op: str) -> None:
    check_input(x, 2, op)
    if x.dim() != 4:
        raise ValueError(f"{op} expects (N, C, H, W) features, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{op} needs at least one channel to average, got shape {tuple(x.shape)}")
    check_p(p, op)


def check_p(p: float, op: str) -> float:
    """The exponent of ``|x|^p`` as a float: a finite number >= 1 (numpy's too), ValueError otherwise."""
    if not is_real(p) or not 1 <= p < math.inf:
        raise ValueError(f"{op}: p must be a finite number >= 1 (|x|^p must be differentiable), got {p!r}")
    return float(p)


def _map_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ktkernels::channel_power_mean", mutates_args=())
def channel_power_mean(x: Tensor, p: float) -> Tensor:
    """(N, C, H, W) -> (N, H, W): ``mean_c |x|^p`` accumulated and returned in fp32 (fp64 for fp64)."""
    out = _channel_power_mean_fake(x, p)
    if out.numel() == 0:
        return out
    name = _resolve(x)
    if name == "torch":
        out.copy_(channel_power_mean_reference(x, p))
    elif name == "triton":
        from . import triton as kernels

        backend.check_triton_span("channel_power_mean", x)
        with backend.triton_device(x):
            kernels.power_mean(x, p, out)
    else:
        torch.ops.ktkernels_C.channel_power_mean_(x, p, out)
    return out


@channel_power_mean.register_fake
def _channel_power_mean_fake(x, p):
    check_power(x, p, "channel_power_mean")
    n, _, h, w = x.shape
    return layout.alloc(x, (n, h, w), False, dtype=_map_dtype(x))


@torch.library.custom_op("ktkernels::channel_power_mean_backward", mutates_args=())
def channel_power_mean_backward(x: Tensor, grad_map: Tensor, p: float) -> Tensor:
    """Gradient of :func:`channel_power_mean`: ``(p/C) |x|^(p-1) sign(x) grad_map``, in x's layout."""
    grad_x = _channel_power_mean_backward_fake(x, grad_map, p)
    if grad_x.numel() == 0:
        return grad_x
    grad_map = grad_map.to(_map_dtype(x)).contiguous()
    name = _resolve(x)
    if name == "torch":
        grad_x.copy_(channel_power_mean_backward_reference(x, grad_map, p))
    elif name == "triton":
        from . import triton as kernels

        backend.check_triton_span("channel_power_mean_backward", x, grad_x)
        with backend.triton_device(x):
            kernels.power_mean_backward(x, grad_map, p, grad_x)
    else:
        torch.ops.ktkernels_C.channel_power_mean_backward_(x, grad_map, p, grad_x)
    return grad_x


@channel_power_mean_backward.register_fake
def _channel_power_mean_backward_fake(x, grad_map, p):
    return layout.alloc(x, tuple(x.shape), channels_inner(x))


def _power_mean_setup(ctx, inputs, output):
    x, ctx.p = inputs
    ctx.save_for_backward(x)


def _power_mean_grad(ctx, grad_map):
    (x,) = ctx.saved_tensors
    return apply(channel_power_mean_backward, x, grad_map, ctx.p), None


def _power_mean_jvp(ctx, x_t, _):
    # d/de mean_c |x + e x_t|^p = sum_c (p/C) |x|^(p-1) sign(x) x_t: the backward's elementwise factor at a map of ones.
    (x,) = ctx.saved_tensors
    ones = torch.ones((x.shape[0], *x.shape[2:]), dtype=_map_dtype(x), device=x.device)
    return (apply(channel_power_mean_backward, x, ones, ctx.p).to(ones.dtype) * x_t).sum(1)


register(
    channel_power_mean,
    "channel_power_mean",
    _power_mean_setup,
    _power_mean_grad,
    _power_mean_jvp,
    forward_saves=lambda inputs, output: inputs[:1],
)
register(channel_power_mean_backward, "channel_power_mean_backward")
register_fold_vmap(channel_power_mean, channel_power_mean_backward)  # (n, c) planes are independent
