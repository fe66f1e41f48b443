"""Triton kernels of the transfer-loss family. All arithmetic in fp32 (bf16/fp16 are converted at the load).

- ``transfer_stats`` / ``transfer_grad``: the pixel/global loss. The forward reads student and teacher once
  and reduces each (n, c) plane to ``sum (s - t)^2`` and the J projections of s and t; the backward is one
  elementwise pass ``grad = a (s - t) + sum_j coef[n, c, j] basis[j, hw]``. A program owns (n, a block of
  channels) and walks the H*W positions; the tile's long side follows the contiguous axis (positions for NCHW,
  channels for channels_last).
- ``map_distance`` / ``map_distance_backward``: one program per sample runs the whole attention-map pipeline
  of :func:`ktkernels.losses.reference.attention_map_distance` on (H, W) <= (64, 64) maps held on chip.
- ``soft_target_forward`` / ``soft_target_backward``: one program per row, online log-sum-exp.

The normalising clamps (1e-12) are ``reference.NORM_EPS``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAP_MAX = 64  # largest map side the on-chip map kernels take; op.py routes larger maps to the reference
_PRECISION = "ieee"  # fp32 products stay fp32: tf32 would cost ~1e-3 relative error on the map transforms


def _tile(x: torch.Tensor, hw: int) -> tuple[int, int]:
    """(BC, BS): channels x positions per tile, BC*BS <= 4096 (registers on the GPU)."""
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels innermost: long side along C
        bc = min(triton.next_power_of_2(x.shape[1]), 64)
        return bc, max(1, min(triton.next_power_of_2(hw), 4096 // bc))
    bs = min(triton.next_power_of_2(hw), 1024)
    return max(1, min(triton.next_power_of_2(x.shape[1]), 4096 // bs)), bs


@triton.jit
def _transfer_stats_kernel(
    s_ptr, t_ptr, basis_ptr, sq_ptr, proj_ptr,
    N, C, HW, W, J, C_BLOCKS,
    ssn, ssc, ssh, ssw, stn, stc, sth, stw,
    BC: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr, HAS_PROJ: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = (pid // C_BLOCKS).to(tl.int64)  # n * stride would wrap in int32 past 2^31 elements
    c = (pid % C_BLOCKS) * BC + tl.arange(0, BC)
    j = tl.arange(0, BJ)  # proj columns; BJ >= J
    c_mask = c < C
    sq = tl.zeros([BC], dtype=tl.float32)
    proj_s = tl.zeros([BC, BJ], dtype=tl.float32)
    proj_t = tl.zeros([BC, BJ], dtype=tl.float32)
    for s0 in range(0, HW, BS):
        pos = s0 + tl.arange(0, BS)
        h, w = pos // W, pos % W
        mask = c_mask[:, None] & (pos < HW)[None, :]
        sv = tl.load(s_ptr + n * ssn + c[:, None] * ssc + h[None, :] * ssh + w[None, :] * ssw, mask=mask, other=0.0)
        tv = tl.load(t_ptr + n * stn + c[:, None] * stc + h[None, :] * sth + w[None, :] * stw, mask=mask, other=0.0)
        sv = sv.to(tl.float32)
        tv = tv.to(tl.float32)
        d = sv - tv
        sq += tl.sum(d * d, axis=1)
        # One basis row at a time, all in 2-D. The (BC, BJ, BS) broadcast-and-reduce these kernels used gave
        # wrong gradients on the H100 (Triton 3.6, BJ = 1) where the interpreter was exact.
        for jj in range(0, J):
            b = tl.load(basis_ptr + jj * HW + pos, mask=pos < HW, other=0.0)
            here = (j == jj)[None, :]
            proj_s += tl.where(here, tl.sum(sv * b[None, :], axis=1)[:, None], 0.0)
            proj_t += tl.where(here, tl.sum(tv * b[None, :], axis=1)[:, None], 0.0)
    tl.store(sq_ptr + n * C + c, sq, mask=c_mask)
    if HAS_PROJ:
        out = (n * C + c[:, None]) * J + j[None, :]
        pmask = c_mask[:, None] & (j[None, :] < J)
        tl.store(proj_ptr + out, proj_s, mask=pmask)
        tl.store(proj_ptr + N.to(tl.int64) * C * J + out, proj_t, mask=pmask)


def transfer_stats(s: torch.Tensor, t: torch.Tensor, basis: torch.Tensor, sq: torch.Tensor, proj: torch.Tensor):
    """``sq[n, c] = sum_hw (s - t)^2``; ``proj[0|1, n, c, j] = sum_hw basis[j, hw] (s|t)[n, c, hw]`` (fp32)."""
    n, c, h, w = s.shape
    j = basis.shape[0]
    bc, bs = _tile(s, h * w)
    c_blocks = triton.cdiv(c, bc)
    _transfer_stats_kernel[(n * c_blocks,)](
        s, t, basis, sq, proj, n, c, h * w, w, j, c_blocks, *s.stride(), *t.stride(),
        BC=bc, BS=bs, BJ=triton.next_power_of_2(max(j, 1)), HAS_PROJ=j > 0,
    )  # fmt: skip


@triton.jit
def _transfer_grad_kernel(
    s_ptr, t_ptr, basis_ptr, a_ptr, coef_ptr, g_ptr,
    C, HW, W, J, C_BLOCKS,
    ssn, ssc, ssh, ssw, stn, stc, sth, stw, sgn, sgc, sgh, sgw,
    BC: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = (pid // C_BLOCKS).to(tl.int64)  # n * stride would wrap in int32 past 2^31 elements
    c = (pid % C_BLOCKS) * BC + tl.arange(0, BC)
    pos = tl.program_id(1) * BS + tl.arange(0, BS)
    h, w = pos // W, pos % W
    mask = (c < C)[:, None] & (pos < HW)[None, :]
    sv = tl.load(s_ptr + n * ssn + c[:, None] * ssc + h[None, :] * ssh + w[None, :] * ssw, mask=mask, other=0.0)
    tv = tl.load(t_ptr + n * stn + c[:, None] * stc + h[None, :] * sth + w[None, :] * stw, mask=mask, other=0.0)
    grad = tl.load(a_ptr) * (sv.to(tl.float32) - tv.to(tl.float32))
    for jj in range(0, J):  # rank-1 updates, 2-D only (see _transfer_stats_kernel)
        b = tl.load(basis_ptr + jj * HW + pos, mask=pos < HW, other=0.0)
        k = tl.load(coef_ptr + (n * C + c) * J + jj, mask=c < C, other=0.0)
        grad += k[:, None] * b[None, :]
    tl.store(g_ptr + n * sgn + c[:, None] * sgc + h[None, :] * sgh + w[None, :] * sgw,
             grad.to(g_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def transfer_grad(s, t, basis, pixel_coef, coef, grad) -> None:
    """``grad = pixel_coef[0] (s - t) + sum_j coef[n, c, j] basis[j, hw]`` in grad's dtype and strides."""
    n, c, h, w = s.shape
    j = basis.shape[0]
    bc, bs = _tile(s, h * w)
    bs = min(bs, 256) if bc == 1 else bs  # the grad tiles need no reduction: more, smaller programs
    c_blocks = triton.cdiv(c, bc)
    _transfer_grad_kernel[(n * c_blocks, triton.cdiv(h * w, bs))](
        s, t, basis, pixel_coef, coef, grad, c, h * w, w, j, c_blocks, *s.stride(), *t.stride(), *grad.stride(),
        BC=bc, BS=bs,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Attention-map distances (one program per sample)


@triton.jit
def _minmax(x, valid):
    """(lo, hi, flat index of lo, flat index of hi) over the valid entries; first occurrence on ties."""
    flat = tl.reshape(x, (x.shape[0] * x.shape[1],))
    vflat = tl.reshape(valid, (x.shape[0] * x.shape[1],))
    lo_src = tl.where(vflat, flat, float("inf"))
    hi_src = tl.where(vflat, flat, float("-inf"))
    i_lo = tl.argmin(lo_src, axis=0, tie_break_left=True)
    i_hi = tl.argmax(hi_src, axis=0, tie_break_left=True)
    return tl.min(lo_src, axis=0), tl.max(hi_src, axis=0), i_lo, i_hi


@triton.jit
def _transform(z, l0, l1, r0t, r1t):
    """``L0 Z R0^T - L1 Z R1^T`` with the right tables passed transposed."""
    a = tl.dot(tl.dot(l0, z, input_precision="ieee"), r0t, input_precision="ieee")
    b = tl.dot(tl.dot(l1, z, input_precision="ieee"), r1t, input_precision="ieee")
    return a - b


@triton.jit
def _coefficients(m, valid, l0, l1, r0t, r1t, count, DIVIDE_BY_MAX: tl.constexpr, ABS: tl.constexpr):
    """The DCT-KD pipeline of one map: returns (D, and what the backward needs)."""
    lo, hi, i_lo, i_hi = _minmax(m, valid)
    den = hi if DIVIDE_BY_MAX else hi - lo
    a_hat = tl.where(valid, (m - lo) / tl.maximum(den, 1e-12), 0.0)
    z = tl.where(valid, a_hat - tl.sum(tl.sum(a_hat, axis=1), axis=0) / count, 0.0)
    r0 = _transform(z, l0, l1, r0t, r1t)
    r = tl.abs(r0) if ABS else r0
    lo2, hi2, j_lo, j_hi = _minmax(r, valid)
    den2 = hi2 if DIVIDE_BY_MAX else hi2 - lo2
    d = tl.where(valid, (r - lo2) / tl.maximum(den2, 1e-12), 0.0)
    return d, a_hat, den, i_lo, i_hi, r0, den2, j_lo, j_hi


@triton.jit
def _minmax_backward(g_out, out, den, i_lo, i_hi, valid, flat_idx, DIVIDE_BY_MAX: tl.constexpr):
    """Gradient of ``out = (x - lo) / max(den, eps)`` (den = hi or hi - lo) with respect to x."""
    denc = tl.maximum(den, 1e-12)
    g_x = g_out / denc
    g_den = tl.where(den >= 1e-12, -tl.sum(tl.sum(g_out * out, axis=1), axis=0) / denc, 0.0)
    g_lo = -tl.sum(tl.sum(g_out, axis=1), axis=0) / denc
    g_hi = g_den
    if not DIVIDE_BY_MAX:
        g_lo -= g_den
    g_x += tl.where(flat_idx == i_lo, g_lo, 0.0) + tl.where(flat_idx == i_hi, g_hi, 0.0)
    return tl.where(valid, g_x, 0.0)


@triton.jit
def _map_distance_kernel(
    ms_ptr, mt_ptr, left_ptr, right_ptr, g_ptr, out_ptr, H, W,
    KIND: tl.constexpr, BACKWARD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)  # n * H * W can pass 2^31
    hh = tl.arange(0, BH)[:, None]
    ww = tl.arange(0, BW)[None, :]
    valid = (hh < H) & (ww < W)
    offs = n * H * W + hh * W + ww
    flat_idx = hh * BW + ww  # row-major order of the padded tile: the same order as h * W + w
    ms = tl.load(ms_ptr + offs, mask=valid, other=0.0)
    mt = tl.load(mt_ptr + offs, mask=valid, other=0.0)
    if KIND < 2:  # attention transfer: L2-normalised maps
        # Correctly rounded sqrt and division (the GPU defaults are approximate), as on the CPU and in CUDA:
        # e.g. a one-position map then normalises to exactly 1 (sqrt_rn(x * x) == |x|), as in float64.
        norm_s = tl.sqrt_rn(tl.sum(tl.sum(ms * ms, axis=1), axis=0))
        norm_t = tl.sqrt_rn(tl.sum(tl.sum(mt * mt, axis=1), axis=0))
        qs = tl.div_rn(ms, tl.maximum(norm_s, 1e-12))
        diff = qs - tl.div_rn(mt, tl.maximum(norm_t, 1e-12))
        sq = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        dist = sq if KIND == 0 else tl.sqrt_rn(sq)
        if BACKWARD:
            g = tl.load(g_ptr + n)
            if KIND == 0:
                gq = 2.0 * g * diff
            else:
                gq = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0) * diff
            dot = tl.sum(tl.sum(gq * qs, axis=1), axis=0)
            gm = tl.where(norm_s >= 1e-12, (gq - qs * dot) / tl.maximum(norm_s, 1e-12), gq / 1e-12)
            tl.store(out_ptr + offs, gm, mask=valid)
        else:
            tl.store(out_ptr + n, dist)
    else:
        DIVIDE_BY_MAX: tl.constexpr = KIND == 2
        ABS: tl.constexpr = KIND == 2
        lh = tl.arange(0, BH)
        lw = tl.arange(0, BW)
        lmask = (lh[:, None] < H) & (lh[None, :] < H)
        rmask = (lw[:, None] < W) & (lw[None, :] < W)
        l_off = lh[:, None] * H + lh[None, :]
        r_off_t = lw[None, :] * W + lw[:, None]  # transposed: r_t[v, k] = R[k, v]
        l0 = tl.load(left_ptr + l_off, mask=lmask, other=0.0)
        l1 = tl.load(left_ptr + H * H + l_off, mask=lmask, other=0.0)
        r0t = tl.load(right_ptr + r_off_t, mask=rmask, other=0.0)
        r1t = tl.load(right_ptr + W * W + r_off_t, mask=rmask, other=0.0)
        count = H * W * 1.0
        ds, a_hat, den_s, i_lo, i_hi, r0, den2, j_lo, j_hi = _coefficients(
            ms, valid, l0, l1, r0t, r1t, count, DIVIDE_BY_MAX, ABS
        )
        dt = _coefficients(mt, valid, l0, l1, r0t, r1t, count, DIVIDE_BY_MAX, ABS)[0]
        diff = ds - dt
        dist = tl.sqrt(tl.sum(tl.sum(diff * diff, axis=1), axis=0))
        if BACKWARD:
            g = tl.load(g_ptr + n)
            g_d = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0) * diff
            g_r = _minmax_backward(g_d, ds, den2, j_lo, j_hi, valid, flat_idx, DIVIDE_BY_MAX)
            if ABS:
                g_r = g_r * tl.where(r0 > 0, 1.0, tl.where(r0 < 0, -1.0, 0.0))
            # Adjoint of the transform: L0^T G R0 - L1^T G R1 (tables transposed back by trans()).
            g_z = tl.dot(tl.dot(tl.trans(l0), g_r, input_precision="ieee"), tl.trans(r0t), input_precision="ieee")
            g_z -= tl.dot(tl.dot(tl.trans(l1), g_r, input_precision="ieee"), tl.trans(r1t), input_precision="ieee")
            g_z = tl.where(valid, g_z, 0.0)
            g_a = tl.where(valid, g_z - tl.sum(tl.sum(g_z, axis=1), axis=0) / count, 0.0)
            g_m = _minmax_backward(g_a, a_hat, den_s, i_lo, i_hi, valid, flat_idx, DIVIDE_BY_MAX)
            tl.store(out_ptr + offs, g_m, mask=valid)
        else:
            tl.store(out_ptr + n, dist)


def _map_launch(map_s, map_t, kind: int, left, right, grad, out, backward: bool) -> None:
    n, h, w = map_s.shape
    # tl.dot needs >= 16 on each side; the AT kinds have no product and take the tight power of two.
    bh = max(16, triton.next_power_of_2(h)) if kind >= 2 else triton.next_power_of_2(h)
    bw = max(16, triton.next_power_of_2(w)) if kind >= 2 else triton.next_power_of_2(w)
    _map_distance_kernel[(n,)](
        map_s, map_t, left, right, grad if grad is not None else map_s, out, h, w,
        KIND=kind, BACKWARD=backward, BH=bh, BW=bw, num_warps=8 if bh * bw >= 1024 else 4,
    )  # fmt: skip


def map_distance(map_s, map_t, kind: int, left, right, dist) -> None:
    """Per-sample distance of (N, H, W) fp32 maps (kinds as in ``basis.MAP_KINDS``), into ``dist`` (N,)."""
    _map_launch(map_s, map_t, kind, left, right, None, dist, False)


def map_distance_backward(map_s, map_t, grad_dist, kind: int, left, right, grad_map) -> None:
    """``grad_map = grad_dist[n] * d dist[n] / d map_s`` for (N, H, W) fp32 maps."""
    _map_launch(map_s, map_t, kind, left, right, grad_dist, grad_map, True)


# ----------------------------------------------------------------------------------------------
# Soft targets (one program per row)


@triton.jit
def _soft_target_forward_kernel(s_ptr, t_ptr, rows_ptr, K, ss, st, inv_t, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * K can pass 2^31 (e.g. token-level distillation)
    m_s = float("-inf")
    m_t = float("-inf")
    sum_s = 0.0
    sum_t = 0.0
    cross = 0.0  # sum_k e^(t_k/T - m_t) (t_k - s_k)/T, rescaled with m_t
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mask = k < K
        raw_s = tl.load(s_ptr + row * ss + k, mask=mask, other=0.0).to(tl.float32) * inv_t
        raw_t = tl.load(t_ptr + row * st + k, mask=mask, other=0.0).to(tl.float32) * inv_t
        zs = tl.where(mask, raw_s, float("-inf"))
        zt = tl.where(mask, raw_t, float("-inf"))
        new_ms = tl.maximum(m_s, tl.max(zs, axis=0))
        new_mt = tl.maximum(m_t, tl.max(zt, axis=0))
        sum_s = sum_s * tl.exp(m_s - new_ms) + tl.sum(tl.exp(zs - new_ms), axis=0)
        e_t = tl.exp(zt - new_mt)
        scale_t = tl.exp(m_t - new_mt)
        sum_t = sum_t * scale_t + tl.sum(e_t, axis=0)
        # e_t = 0 where masked or p_t = 0: adds 0, even for raw_t = -inf (0 log 0 = 0)
        cross = cross * scale_t + tl.sum(tl.where(e_t == 0, 0.0, e_t * (raw_t - raw_s)), axis=0)
        m_s = new_ms
        m_t = new_mt
    lse_s = m_s + tl.log(sum_s)
    lse_t = m_t + tl.log(sum_t)
    tl.store(rows_ptr + row * 3, cross / sum_t - lse_t + lse_s)
    tl.store(rows_ptr + row * 3 + 1, lse_s)
    tl.store(rows_ptr + row * 3 + 2, lse_t)


def soft_target_forward(s: torch.Tensor, t: torch.Tensor, temperature: float, rows: torch.Tensor) -> None:
    """rows (N, 3) fp32: ``[KL(p_t || p_s), logsumexp(s/T), logsumexp(t/T)]`` for (N, K) logits (unit K stride)."""
    n, k = s.shape
    bk = min(triton.next_power_of_2(k), 4096)
    _soft_target_forward_kernel[(n,)](s, t, rows, k, s.stride(0), t.stride(0), 1.0 / temperature, BK=bk,
                                      num_warps=8 if bk >= 2048 else 4)  # fmt: skip


@triton.jit
def _soft_target_backward_kernel(
    s_ptr, t_ptr, rows_ptr, g_ptr, gs_ptr, gt_ptr, K, ss, st, inv_t,
    BK: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = k < K
    kl = tl.load(rows_ptr + row * 3)
    lse_s = tl.load(rows_ptr + row * 3 + 1)
    lse_t = tl.load(rows_ptr + row * 3 + 2)
    g = tl.load(g_ptr + row) * inv_t
    log_ps = tl.load(s_ptr + row * ss + k, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
    log_pt = tl.load(t_ptr + row * st + k, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
    p_t = tl.exp(log_pt)
    if GRAD_S:
        tl.store(gs_ptr + row * K + k, (g * (tl.exp(log_ps) - p_t)).to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        grad_t = tl.where(p_t == 0, 0.0, g * p_t * (log_pt - log_ps - kl))  # NaN p_t: NaN, as the loss
        tl.store(gt_ptr + row * K + k, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


def soft_target_backward(s, t, temperature: float, rows, grad_rows, grad_s, grad_t) -> None:
    """grad_s = g/T (p_s - p_t), grad_t = g/T p_t (log p_t - log p_s - kl); an empty output is skipped."""
    n, k = s.shape
    bk = min(triton.next_power_of_2(k), 1024)
    _soft_target_backward_kernel[(n, triton.cdiv(k, bk))](
        s, t, rows, grad_rows, grad_s if grad_s.numel() else s, grad_t if grad_t.numel() else s, k,
        s.stride(0), t.stride(0), 1.0 / temperature,
        BK=bk, GRAD_S=grad_s.numel() > 0, GRAD_T=grad_t.numel() > 0,
    )  # fmt: skip
