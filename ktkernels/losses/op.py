"""torch.library ops of the transfer-loss family: validation, fake impls, autograd, dispatch to the backends.

- ``ktkernels::pixel_global_terms(s, t, global_mode, keep) -> (terms (2,), proj)``: the unweighted
  ``[pixel, global]`` terms of the KTFT loss from one read of each feature tensor; ``proj`` (2, N, C, J) are
  the pooled projections the backward needs (no gradient flows through them).
  Backward: ``ktkernels::transfer_grad``, one elementwise pass per tensor that needs a gradient.
- ``ktkernels::attention_map_distance(map_s, map_t, kind) -> (N,)``: per-sample distances of attention maps
  (AT and DCT-KD); backward ``ktkernels::attention_map_distance_backward``. Maps larger than 64 x 64 take the
  reference on every backend (the on-chip map kernels stop there; the maps are tiny next to the features).
- ``ktkernels::soft_target_kl(s, t, temperature) -> (kl (N,), lse (N, 2))``: per-row KL at temperature T in
  one pass; backward ``ktkernels::soft_target_kl_backward``.

The feature reductions use the DCT family's ``channel_power_mean`` op. fp32/fp16/bf16 accumulate in fp32;
fp64 runs on the cpu and torch backends (Triton fp64 falls back to torch under ``auto`` and raises when named).
The functional API calls the ops through ``ktkernels.autograd.apply``: under torch.func they run as
autograd.Functions with the same backward formulas (reverse mode; forward mode raises naming the op).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend, layout
from ..autograd import apply, register, register_fold_vmap
from ..checks import is_int, is_real
from ..layout import channels_inner
from . import reference
from .basis import MAP_KINDS, map_tables, projection_basis

FAMILY = "losses"
MAP_MAX = 64  # largest map side of the fused map kernels (Triton tile, CUDA shared memory)


def acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _resolve(x: Tensor) -> str:
    return backend.resolve_for(FAMILY, x, triton_fp64=False)


def _kernels():
    from . import triton as kernels

    return kernels


# ----------------------------------------------------------------------------------------------
# Pixel / global transfer terms


def _check_pair(s: Tensor, t: Tensor, op: str) -> None:
    for name, x in (("student", s), ("teacher", t)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if s.dim() != 4:
        raise ValueError(f"{op} expects (N, C, H, W) features, got student shape {tuple(s.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"{op}: student {tuple(s.shape)} and teacher {tuple(t.shape)} shapes differ")
    if s.dtype != t.dtype or s.device != t.device:
        raise ValueError(f"{op}: student ({s.dtype}, {s.device}) and teacher ({t.dtype}, {t.device}) differ")


def check_keep(keep: int) -> int:
    """``keep`` as an int >= 1 (numpy's too); ValueError otherwise."""
    if not is_int(keep) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    return int(keep)


@torch.library.custom_op("ktkernels::pixel_global_terms", mutates_args=())
def pixel_global_terms(s: Tensor, t: Tensor, global_mode: str, keep: int) -> tuple[Tensor, Tensor]:
    """``([pixel, global], proj)`` for (N, C, H, W) features; see :func:`reference.pixel_global_terms`."""
    terms, proj = _pixel_global_terms_fake(s, t, global_mode, keep)
    n, c, h, w = s.shape
    name = _resolve(s)
    if s.numel() == 0:
        terms.zero_()
        return terms, proj.zero_()
    basis = projection_basis(global_mode, keep, h, w, acc_dtype(s), s.device)
    if name == "torch":
        sq, proj_value = reference.transfer_stats(s, t, basis)
        proj.copy_(proj_value)
    else:
        sq = layout.alloc(s, (n, c), False, acc_dtype(s))
        if name == "triton":
            backend.check_triton_span("pixel_global_terms", s, t)
            with backend.triton_device(s):
                _kernels().transfer_stats(s, t, basis, sq, proj)
        else:
            torch.ops.ktkernels_C.transfer_stats_(s, t, basis, sq, proj)
    terms[0] = sq.sum() / s.numel()
    terms[1] = reference.global_term(global_mode, proj[0], proj[1])
    return terms, proj


@pixel_global_terms.register_fake
def _pixel_global_terms_fake(s, t, global_mode, keep):
    _check_pair(s, t, "pixel_global_terms")
    if global_mode not in reference.GLOBAL_MODES:
        raise ValueError(f"global_mode must be one of {reference.GLOBAL_MODES}, got {global_mode!r}")
    check_keep(keep)
    n, c, h, w = s.shape
    j = {"none": 0, "dct_lowpass": min(keep, h) * min(keep, w)}.get(global_mode, 1)
    acc = acc_dtype(s)
    return s.new_empty((2,), dtype=acc), layout.alloc(s, (2, n, c, j), False, acc)


@torch.library.custom_op("ktkernels::transfer_grad", mutates_args=())
def transfer_grad(s: Tensor, t: Tensor, pixel_coef: Tensor, coef: Tensor, global_mode: str, keep: int) -> Tensor:
    """``pixel_coef (s - t) + sum_j coef[n, c, j] basis[j, hw]`` in s's dtype and layout (one pass), with the
    :func:`projection_basis` of ``global_mode``."""
    grad = _transfer_grad_fake(s, t, pixel_coef, coef, global_mode, keep)
    if grad.numel() == 0:
        return grad
    basis = projection_basis(global_mode, keep, s.shape[2], s.shape[3], acc_dtype(s), s.device)
    name = _resolve(s)
    if name == "torch":
        grad.copy_(reference.transfer_grad(s, t, basis, pixel_coef, coef))
    elif name == "triton":
        backend.check_triton_span("transfer_grad", s, t, grad)
        with backend.triton_device(s):
            _kernels().transfer_grad(s, t, basis, pixel_coef, coef, grad)
    else:
        torch.ops.ktkernels_C.transfer_grad_(s, t, basis, pixel_coef, coef, grad)
    return grad


@transfer_grad.register_fake
def _transfer_grad_fake(s, t, pixel_coef, coef, global_mode, keep):
    return layout.alloc(s, tuple(s.shape), channels_inner(s))


def _global_coefs(mode: str, proj: Tensor, g_global: Tensor) -> tuple[Tensor, Tensor]:
    """d(global term)/d(proj_s), d/d(proj_t), times the upstream gradient: (N, C, J) each."""
    proj_s, proj_t = proj[0], proj[1]
    n, c = proj_s.shape[:2]
    if mode == "none" or n * c == 0:
        return proj_s, proj_t
    if mode != "cosine":
        coef = (2.0 / (n * c)) * g_global * (proj_s - proj_t)
        return coef, -coef
    a, b = proj_s[..., 0], proj_t[..., 0]
    eps = reference.COSINE_EPS
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    na, nb = norm_a.clamp_min(eps), norm_b.clamp_min(eps)
    cos = (a * b).sum(dim=1, keepdim=True) / (na * nb)
    # d cos / d a = b / (na nb) - cos a / na^2 while ||a|| >= eps (the clamp passes the gradient), else b / (eps nb).
    grad_a = b / (na * nb) - torch.where(norm_a >= eps, cos * a / (na * norm_a.clamp_min(eps)), 0.0)
    grad_b = a / (na * nb) - torch.where(norm_b >= eps, cos * b / (nb * norm_b.clamp_min(eps)), 0.0)
    scale = -g_global / n
    return (scale * grad_a)[..., None], (scale * grad_b)[..., None]


def _pixel_global_setup(ctx, inputs, output):
    s, t, ctx.mode, ctx.keep = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(s, t, output[1])


def _pixel_global_backward(ctx, grad_terms, _grad_proj):
    s, t, proj = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    if s.numel() == 0:
        return torch.zeros_like(s) if need_s else None, torch.zeros_like(t) if need_t else None, None, None
    grad_terms = grad_terms.to(proj.dtype)
    pixel_coef = (2.0 / s.numel()) * grad_terms[0:1]
    coef_s, coef_t = _global_coefs(ctx.mode, proj, grad_terms[1])
    grad_s = apply(transfer_grad, s, t, pixel_coef, coef_s.contiguous(), ctx.mode, ctx.keep) if need_s else None
    grad_t = apply(transfer_grad, t, s, pixel_coef, coef_t.contiguous(), ctx.mode, ctx.keep) if need_t else None
    return grad_s, grad_t, None, None


# Autograd and torch.func (ktkernels.autograd): the terms reduce over the batch, so vmap loops; no forward mode.
register(pixel_global_terms, "pixel_global_terms", _pixel_global_setup, _pixel_global_backward, vmap=None)
register(transfer_grad, "transfer_grad", vmap=None)


# ----------------------------------------------------------------------------------------------
# Attention-map distances


def _check_maps(map_s: Tensor, map_t: Tensor, kind: str, op: str) -> None:
    if kind not in MAP_KINDS:
        raise ValueError(f"{op}: kind must be one of {MAP_KINDS}, got {kind!r}")
    if map_s.dim() != 3 or map_s.shape != map_t.shape:
        raise ValueError(
            f"{op} expects two (N, H, W) maps of one shape, got {tuple(map_s.shape)}, {tuple(map_t.shape)}"
        )
    if map_s.dtype not in (torch.float32, torch.float64) or map_t.dtype != map_s.dtype:
        raise TypeError(f"{op}: maps must both be float32 or both float64, got {map_s.dtype}, {map_t.dtype}")


def _map_backend(maps: Tensor) -> str:
    name = _resolve(maps)
    return "torch" if max(maps.shape[1:], default=0) > MAP_MAX and name != "cpu" else name


@torch.library.custom_op("ktkernels::attention_map_distance", mutates_args=())
def attention_map_distance(map_s: Tensor, map_t: Tensor, kind: str) -> Tensor:
    """(N, H, W) maps -> (N,) distances; see :func:`reference.attention_map_distance`."""
    dist = _attention_map_distance_fake(map_s, map_t, kind)
    if dist.numel() == 0:
        return dist
    name = _map_backend(map_s)
    ms, mt = map_s.contiguous(), map_t.contiguous()
    if name == "torch":
        dist.copy_(reference.attention_map_distance(ms, mt, kind))
        return dist
    left, right = map_tables(kind, ms.shape[1], ms.shape[2], ms.dtype, ms.device)
    if name == "triton":
        with backend.triton_device(ms):
            _kernels().map_distance(ms, mt, MAP_KINDS.index(kind), left, right, dist)
    else:
        torch.ops.ktkernels_C.attention_map_distance_(ms, mt, MAP_KINDS.index(kind), left, right, dist)
    return dist


@attention_map_distance.register_fake
def _attention_map_distance_fake(map_s, map_t, kind):
    _check_maps(map_s, map_t, kind, "attention_map_distance")
    return layout.alloc(map_s, (map_s.shape[0],), False)


@torch.library.custom_op("ktkernels::attention_map_distance_backward", mutates_args=())
def attention_map_distance_backward(map_s: Tensor, map_t: Tensor, grad_dist: Tensor, kind: str) -> Tensor:
    """``grad_dist[n] * d dist[n] / d map_s[n]``: (N, H, W)."""
    grad = _attention_map_distance_backward_fake(map_s, map_t, grad_dist, kind)
    if grad.numel() == 0:
        return grad
    name = _map_backend(map_s)
    ms, mt = map_s.contiguous(), map_t.contiguous()
    g = grad_dist.to(ms.dtype).contiguous()
    if name == "torch":
        # torch.func, not autograd: inside a custom op's implementation the autograd keys are excluded.
        _, vjp = torch.func.vjp(lambda m: reference.attention_map_distance(m, mt, kind), ms)
        grad.copy_(vjp(g)[0])
        return grad
    left, right = map_tables(kind, ms.shape[1], ms.shape[2], ms.dtype, ms.device)
    if name == "triton":
        with backend.triton_device(ms):
            _kernels().map_distance_backward(ms, mt, g, MAP_KINDS.index(kind), left, right, grad)
    else:
        torch.ops.ktkernels_C.attention_map_distance_backward_(ms, mt, g, MAP_KINDS.index(kind), left, right, grad)
    return grad


@attention_map_distance_backward.register_fake
def _attention_map_distance_backward_fake(map_s, map_t, grad_dist, kind):
    _check_maps(map_s, map_t, kind, "attention_map_distance_backward")
    return layout.alloc(map_s, tuple(map_s.shape), False)


def _map_setup(ctx, inputs, output):
    map_s, map_t, ctx.kind = inputs
    ctx.save_for_backward(map_s, map_t)


def _map_backward(ctx, grad_dist):
    map_s, map_t = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    # The distance is symmetric in its two maps: the teacher's gradient is the same op with the roles swapped.
    grad_s = apply(attention_map_distance_backward, map_s, map_t, grad_dist, ctx.kind) if need_s else None
    grad_t = apply(attention_map_distance_backward, map_t, map_s, grad_dist, ctx.kind) if need_t else None
    return grad_s, grad_t, None


# Autograd and torch.func: the distances are per sample, so vmap folds into the batch; no forward mode.
register(attention_map_distance, "attention_map_distance", _map_setup, _map_backward)
register(attention_map_distance_backward, "attention_map_distance_backward")
register_fold_vmap(attention_map_distance, attention_map_distance_backward)


# ----------------------------------------------------------------------------------------------
# Soft targets


def check_logits(s: Tensor, t: Tensor, temperature: float, op: str) -> None:
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"{op} expects (N, K) logits of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.dtype != t.dtype or s.device != t.device:
        raise ValueError(f"{op}: student ({s.dtype}, {s.device}) and teacher ({t.dtype}, {t.device}) logits differ")
    check_temperature(temperature, op)


def check_temperature(temperature: float, op: str) -> float:
    """A finite number > 0 (numpy's too) whose square (the loss scale T^2) is finite and non-zero, as a float."""
    if not is_real(temperature):
        raise ValueError(f"{op}: temperature must be a number > 0, got {temperature!r}")
    if not (0 < temperature < math.inf and 0 < temperature * temperature < math.inf):
        raise ValueError(f"{op}: temperature must be finite and > 0, with a finite non-zero square, got {temperature}")
    return float(temperature)


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("ktkernels::soft_target_kl", mutates_args=())
def soft_target_kl(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(N, K) logits -> (``KL(softmax(t/T) || softmax(s/T))`` per row (N,), logsumexp of s/T and t/T (N, 2))."""
    kl, lse = _soft_target_kl_fake(s, t, temperature)
    if kl.numel() == 0:
        return kl, lse
    name = _resolve(s)
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    if name == "torch" or s.shape[1] == 0:
        rows = reference.soft_target_stats(s, t, temperature)
    else:
        rows = layout.alloc(s, (s.shape[0], 3), False, acc_dtype(s))
        if name == "triton":
            backend.check_triton_span("soft_target_kl", s, t)
            with backend.triton_device(s):
                _kernels().soft_target_forward(s, t, temperature, rows)
        else:
            torch.ops.ktkernels_C.soft_target_forward_(s, t, temperature, rows)
    kl.copy_(rows[:, 0])
    lse.copy_(rows[:, 1:])
    return kl, lse


@soft_target_kl.register_fake
def _soft_target_kl_fake(s, t, temperature):
    check_logits(s, t, temperature, "soft_target_kl")
    acc = acc_dtype(s)
    return s.new_empty((s.shape[0],), dtype=acc), s.new_empty((s.shape[0], 2), dtype=acc)


@torch.library.custom_op("ktkernels::soft_target_kl_backward", mutates_args=())
def soft_target_kl_backward(
    s: Tensor, t: Tensor, temperature: float, kl: Tensor, lse: Tensor, grad_kl: Tensor, need_s: bool, need_t: bool
) -> tuple[Tensor, Tensor]:
    """(grad_s, grad_t) of ``sum_n grad_kl[n] kl[n]``; an unneeded one is returned empty."""
    grad_s, grad_t = _soft_target_kl_backward_fake(s, t, temperature, kl, lse, grad_kl, need_s, need_t)
    if s.numel() == 0:
        return grad_s, grad_t
    name = _resolve(s)
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    rows = torch.cat([kl[:, None], lse], dim=1).contiguous()
    g = grad_kl.to(rows.dtype).contiguous()
    if name == "torch":
        ref_s, ref_t = reference.soft_target_grads(s, t, temperature, rows, g)
        if need_s:
            grad_s.copy_(ref_s)
        if need_t:
            grad_t.copy_(ref_t)
    elif name == "triton":
        backend.check_triton_span("soft_target_kl_backward", s, t)
        with backend.triton_device(s):
            _kernels().soft_target_backward(s, t, temperature, rows, g, grad_s, grad_t)
    else:
        torch.ops.ktkernels_C.soft_target_backward_(s, t, temperature, rows, g, grad_s, grad_t)
    return grad_s, grad_t


@soft_target_kl_backward.register_fake
def _soft_target_kl_backward_fake(s, t, temperature, kl, lse, grad_kl, need_s, need_t):
    empty = (0, s.shape[1])
    return layout.alloc(s, tuple(s.shape) if need_s else empty, False), layout.alloc(
        t, tuple(t.shape) if need_t else empty, False
    )


def _soft_target_setup(ctx, inputs, output):
    s, t, ctx.temperature = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(s, t, output[0], output[1])


def _soft_target_backward(ctx, grad_kl, _grad_lse):
    s, t, kl, lse = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    grad_s, grad_t = apply(soft_target_kl_backward, s, t, ctx.temperature, kl, lse, grad_kl, need_s, need_t)
    return grad_s if need_s else None, grad_t if need_t else None, None


# Autograd and torch.func: the KL is per row, so vmap folds into the batch; no forward mode.
register(soft_target_kl, "soft_target_kl", _soft_target_setup, _soft_target_backward)
register(soft_target_kl_backward, "soft_target_kl_backward")
register_fold_vmap(soft_target_kl, soft_target_kl_backward)
