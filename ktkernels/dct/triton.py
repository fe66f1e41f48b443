"""Triton kernels of the DCT family.

``basis2d``: each program loads a tile of BC whole (H, W) maps once, multiplies by ``right^T`` along W and by
``left^T`` along H on chip (``tl.dot``; sizes padded to powers of two >= 16, padding masked to zero) and
writes the (Ho, Wo) result once. It serves the forward (DCT rows) and the backward (their transpose).
``power_mean`` / ``power_mean_backward``: the channel reduction of the DCT attention map and its
elementwise gradient, one pass over the features each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fp32 dot products must stay fp32 (tf32 would cost ~1e-3 relative error on a 56-point sum).
_PRECISION = "ieee"
_MAX_TILE = 8192  # fp32 elements of one program's input tile: keeps the tile in registers on the GPU


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _basis2d_kernel(
    x_ptr, left_ptr, right_ptr, y_ptr,
    C, H, W, HO, WO, C_BLOCKS,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BHO: tl.constexpr, BWO: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = (pid // C_BLOCKS).to(tl.int64)  # n * stride would wrap in int32 past 2^31 elements
    c = (pid % C_BLOCKS) * BC + tl.arange(0, BC)
    h = tl.arange(0, BH)
    w = tl.arange(0, BW)
    ho = tl.arange(0, BHO)
    wo = tl.arange(0, BWO)
    c3, h3, w3 = c[:, None, None], h[None, :, None], w[None, None, :]
    x_mask = (c3 < C) & (h3 < H) & (w3 < W)
    x = tl.load(x_ptr + n * sxn + c3 * sxc + h3 * sxh + w3 * sxw, mask=x_mask, other=0.0).to(ACC)
    # right^T (W x Wo) and left^T (H x Ho), zero outside the true sizes so padding adds nothing.
    right_t = tl.load(right_ptr + wo[None, :] * W + w[:, None], mask=(w[:, None] < W) & (wo[None, :] < WO), other=0.0)
    left_t = tl.load(left_ptr + ho[None, :] * H + h[:, None], mask=(h[:, None] < H) & (ho[None, :] < HO), other=0.0)
    t = tl.dot(tl.reshape(x, (BC * BH, BW)), right_t.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    t = tl.permute(tl.reshape(t, (BC, BH, BWO)), (0, 2, 1))  # (BC, Wo, H): H is now the contracted axis
    y = tl.dot(tl.reshape(t, (BC * BWO, BH)), left_t.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    y = tl.reshape(y, (BC, BWO, BHO))
    wo3, ho3 = wo[None, :, None], ho[None, None, :]
    y_mask = (c3 < C) & (wo3 < WO) & (ho3 < HO)
    tl.store(y_ptr + n * syn + c3 * syc + ho3 * syh + wo3 * syw, y.to(y_ptr.dtype.element_ty), mask=y_mask)


def basis2d(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
    """``out[n, c] = left @ x[n, c] @ right^T`` for 4-D ``x`` (N, C, H, W) and ``out`` (N, C, Ho, Wo), any strides."""
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    bh, bw, bho, bwo = _pad(h), _pad(w), _pad(ho), _pad(wo)
    biggest = max(bh * bw, bh * bwo, bho * bwo)
    bc = max(1, min(triton.next_power_of_2(c), _MAX_TILE // biggest))
    c_blocks = triton.cdiv(c, bc)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _basis2d_kernel[(n * c_blocks,)](
        x, left, right, out, c, h, w, ho, wo, c_blocks, *x.stride(), *out.stride(),
        BC=bc, BH=bh, BW=bw, BHO=bho, BWO=bwo, ACC=acc, PRECISION=_PRECISION,
        num_warps=8 if bc * biggest >= 4096 else 4,
    )  # fmt: skip


@triton.jit
def _power(a, p, P_MODE: tl.constexpr):
    """|x|^p for a = |x| >= 0: exact for p = 1 and 2; exp2(p log2 a) otherwise (0 at a = 0 for p > 0)."""
    if P_MODE == 2:
        return a * a
    elif P_MODE == 1:
        return a
    else:
        return tl.exp2(p * tl.log2(a))


@triton.jit
def _power_mean_kernel(
    x_ptr, out_ptr, C, HW, W, S_BLOCKS, sxn, sxc, sxh, sxw, p, inv_c,
    BC: tl.constexpr, BS: tl.constexpr, P_MODE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # The batch rides on grid axis 0 (grid axes 1 and 2 stop at 65535), in int64 (n * stride can pass 2^31).
    pid = tl.program_id(0)
    n = (pid // S_BLOCKS).to(tl.int64)
    s = (pid % S_BLOCKS) * BS + tl.arange(0, BS)
    s_mask = s < HW
    offset = n * sxn + (s // W) * sxh + (s % W) * sxw
    acc = tl.zeros([BS], dtype=ACC)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mask = (c[:, None] < C) & s_mask[None, :]
        v = tl.load(x_ptr + offset[None, :] + c[:, None] * sxc, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(_power(tl.abs(v), p, P_MODE), axis=0)
    tl.store(out_ptr + n * HW + s, acc * inv_c, mask=s_mask)


@triton.jit
def _power_mean_backward_kernel(
    x_ptr, g_ptr, gx_ptr, C, HW, W, S_BLOCKS, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, p, scale,
    BC: tl.constexpr, BS: tl.constexpr, P_MODE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (n, spatial block) as in _power_mean_kernel
    n = (pid // S_BLOCKS).to(tl.int64)
    s = (pid % S_BLOCKS) * BS + tl.arange(0, BS)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    h, w = s // W, s % W
    mask = (c[:, None] < C) & (s[None, :] < HW)
    v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + h[None, :] * sxh + w[None, :] * sxw, mask=mask, other=0.0)
    v = v.to(ACC)
    g = tl.load(g_ptr + n * HW + s, mask=s < HW, other=0.0).to(ACC)
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(ACC)
    if P_MODE == 2:
        d = v
    elif P_MODE == 1:
        d = sign
    else:
        d = sign * _power(tl.abs(v), p - 1.0, 0)
    out = d * scale * g[None, :]
    tl.store(gx_ptr + n * sgn + c[:, None] * sgc + h[None, :] * sgh + w[None, :] * sgw,
             out.to(gx_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def _p_mode(p: float) -> int:
    return 2 if p == 2 else 1 if p == 1 else 0


def _reduce_tile(x: torch.Tensor) -> tuple[int, int]:
    """(BC, BS): channels along the contiguous axis for channels_last, spatial positions otherwise."""
    if x.stride(1) == 1 and x.shape[1] > 1:
        return 32, 64
    return 4, 256


def power_mean(x: torch.Tensor, p: float, out: torch.Tensor) -> None:
    """``out[n, h, w] = mean_c |x[n, c, h, w]|^p`` for (N, C, H, W) ``x`` and contiguous (N, H, W) ``out``."""
    n, c, h, w = x.shape
    bc, bs = _reduce_tile(x)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    s_blocks = triton.cdiv(h * w, bs)
    _power_mean_kernel[(n * s_blocks,)](
        x, out, c, h * w, w, s_blocks, *x.stride(), p, 1.0 / c, BC=bc, BS=bs, P_MODE=_p_mode(p), ACC=acc
    )  # fmt: skip


def power_mean_backward(x: torch.Tensor, grad_map: torch.Tensor, p: float, grad_x: torch.Tensor) -> None:
    """``grad_x = (p / C) |x|^(p-1) sign(x) * grad_map`` broadcast over C."""
    n, c, h, w = x.shape
    bc, bs = _reduce_tile(x)
    acc = tl.float64 if grad_map.dtype == torch.float64 else tl.float32
    s_blocks = triton.cdiv(h * w, bs)
    _power_mean_backward_kernel[(n * s_blocks, triton.cdiv(c, bc))](
        x, grad_map, grad_x, c, h * w, w, s_blocks, *x.stride(), *grad_x.stride(), p, p / c,
        BC=bc, BS=bs, P_MODE=_p_mode(p), ACC=acc,
    )  # fmt: skip
