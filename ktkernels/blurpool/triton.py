"""Triton kernels for the blur-pool family and their launchers.

Each program computes a (BC, BH, BW) tile of one image: BC channels x BH rows x BW columns.
The launcher picks the tile from the memory layout. NCHW-like inputs use a wide BW, channels_last
inputs a wide BC, so that the innermost memory axis is the fastest tile axis (Triton orders the tile
by the contiguity it can prove). All index maths of padding sits in the (index, weight) tables of
``geometry.py``, so the blur forward, its backward and BlurPool1d are the same gather kernel.
Maths is fp32 (fp64 for fp64 inputs) right after every load: bf16 arithmetic is also wrong under the
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


NUM_WARPS = 4
# Max-blur unrolls k*k taps x kmax*kmax window loads: 8-byte vectors keep it near 128 registers, 16-byte
# vectors need ~190 (8 resident warps per SM instead of 16).
MAX_BLUR_VECTOR = 8


def _tile(
    channels: int, rows: int, cols: int, channels_inner: bool, itemsize: int, vector_bytes: int = 16
) -> tuple[int, int, int, int]:
    """(BC, BH, BW, num_warps) for an output region of channels x rows x cols of ``itemsize``-byte elements.

    channels_inner tiles give each thread one ``vector_bytes`` vector along C (16: 4 fp32, 8 bf16), loaded
    as one instruction per tap. Planar tiles gather element by element (the taps of stride-s outputs are
    not contiguous), 4 per thread. More elements per thread multiply the registers by the unrolled taps
    and cut the resident warps (``python -m ktkernels.bench codegen``; benchmarks/NOTES.md, "codegen").
    """
    if channels_inner:
        per_thread = max(vector_bytes // itemsize, 1)
        elements = 32 * NUM_WARPS * per_thread
        bc = min(_next_pow2(channels), 16 * per_thread)
        bw = min(_next_pow2(cols), max(1, elements // bc))
        bh = min(_next_pow2(rows), max(1, elements // (bc * bw)))
    else:
        elements = 32 * NUM_WARPS * 4
        bw = min(_next_pow2(cols), 64)
        bh = min(_next_pow2(rows), max(1, elements // bw))
        bc = min(_next_pow2(channels), max(1, elements // (bh * bw)))
    return bc, bh, bw, NUM_WARPS


@triton.jit
def _tile_coords(C, HO, WO, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """This program's image index and (BC,1,1), (1,BH,1), (1,1,BW) channel/row/column indices."""
    pid = tl.program_id(0)
    n_wb = tl.cdiv(WO, BW)
    n_hb = tl.cdiv(HO, BH)
    n_cb = tl.cdiv(C, BC)
    wb = pid % n_wb
    rest = pid // n_wb
    hb = rest % n_hb
    rest = rest // n_hb
    cb = rest % n_cb
    n = rest // n_cb
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    i = hb * BH + tl.arange(0, BH)[None, :, None]
    j = wb * BW + tl.arange(0, BW)[None, None, :]
    return n, c, i, j


@triton.jit
def _window_max(base, r, q, ok, H, W, s_h, s_w, PMAX, KMAX: tl.constexpr, ACC: tl.constexpr):
    """max over x[r+a-PMAX, q+b-PMAX], a,b < KMAX (out-of-range excluded; NaN propagates)."""
    best = tl.full(ok.shape, float("-inf"), ACC)
    for a in tl.static_range(KMAX):
        rr = r + (a - PMAX)
        for b in tl.static_range(KMAX):
            qq = q + (b - PMAX)
            inside = ok & (rr >= 0) & (rr < H) & (qq >= 0) & (qq < W)
            v = tl.load(base + rr * s_h + qq * s_w, mask=inside, other=float("-inf")).to(ACC)
            best = tl.where(inside & ((v > best) | (v != v)), v, best)
    return best


@triton.jit
def _separable_sum(
    base,
    rows,
    row_ok,
    cols,
    col_ok,
    ok,
    ri_ptr,
    rw_ptr,
    ci_ptr,
    cw_ptr,
    H,
    W,
    s_h,
    s_w,
    PMAX,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
):
    """sum_u sum_v rw[rows,u] * cw[cols,v] * src[ri[rows,u], ci[cols,v]], accumulated in ACC.

    ``src`` is the tensor at ``base`` (KMAX == 0) or its stride-1 KMAX x KMAX max map. Taps with
    weight 0 (zero padding, unused adjoint slots) are not loaded, so inf/NaN elsewhere cannot leak.
    """
    acc = tl.zeros(ok.shape, ACC)
    for u in tl.static_range(KH):
        r = tl.load(ri_ptr + rows * KH + u, mask=row_ok, other=0)
        rw = tl.load(rw_ptr + rows * KH + u, mask=row_ok, other=0.0)
        line = tl.zeros(ok.shape, ACC)
        for v in tl.static_range(KW):
            q = tl.load(ci_ptr + cols * KW + v, mask=col_ok, other=0)
            cw = tl.load(cw_ptr + cols * KW + v, mask=col_ok, other=0.0)
            live = ok & (rw != 0.0) & (cw != 0.0)
            if KMAX == 0:
                val = tl.load(base + r * s_h + q * s_w, mask=live, other=0.0).to(ACC)
            else:
                val = tl.where(live, _window_max(base, r, q, live, H, W, s_h, s_w, PMAX, KMAX, ACC), 0.0)
            line += cw * val
        acc += rw * line
    return acc


# Spatial sizes are not specialised (fewer recompiles across shapes). Strides and C are: a unit inner
# stride proves contiguity, and C % 16 == 0 proves the channel mask constant over a vector; without the
# latter every channels_last tap compiled to scalar loads (benchmarks/NOTES.md, "codegen").
@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "HM", "WM", "STRIDE_H", "STRIDE_W", "PMAX"])
def _gather_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    ri_ptr,
    rw_ptr,
    ci_ptr,
    cw_ptr,
    C,
    H,
    W,
    HO,
    WO,
    HM,
    WM,
    sxn,
    sxc,
    sxh,
    sxw,
    son,
    soc,
    soh,
    sow,
    skn,
    skc,
    skh,
    skw,
    STRIDE_H,
    STRIDE_W,
    PMAX,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KMAX: tl.constexpr,
    OWN_H: tl.constexpr,
    OWN_W: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """out = gather(x) (KMAX == 0) or gather(maxmap(x)) plus the argmax codes this tile owns."""
    n, c, i, j = _tile_coords(C, HO, WO, BC, BH, BW)
    c_ok = c < C
    i_ok = i < HO
    j_ok = j < WO
    ok = c_ok & i_ok & j_ok
    base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    acc = _separable_sum(
        base, i, i_ok, j, j_ok, ok, ri_ptr, rw_ptr, ci_ptr, cw_ptr, H, W, sxh, sxw, PMAX, KH, KW, KMAX, ACC
    )
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + i * soh + j * sow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
    if KMAX > 0:
        # Output (i, j) owns max-map rows [s*i, s*i + s) and columns alike; the last row/column of
        # outputs also owns the remainder. So each code is computed and written exactly once.
        codes = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * skc
        for oh in tl.static_range(OWN_H):
            r = i * STRIDE_H + oh
            r_ok = i_ok & (r < HM) & ((oh < STRIDE_H) | (i == HO - 1))
            for ow in tl.static_range(OWN_W):
                q = j * STRIDE_W + ow
                q_ok = j_ok & (q < WM) & ((ow < STRIDE_W) | (j == WO - 1))
                live = c_ok & r_ok & q_ok
                best = tl.full(live.shape, float("-inf"), ACC)
                code = tl.full(live.shape, -1, tl.int32)
                for a in tl.static_range(KMAX):
                    rr = r + (a - PMAX)
                    for b in tl.static_range(KMAX):
                        qq = q + (b - PMAX)
                        inside = live & (rr >= 0) & (rr < H) & (qq >= 0) & (qq < W)
                        v = tl.load(base + rr * sxh + qq * sxw, mask=inside, other=float("-inf")).to(ACC)
                        take = inside & ((v > best) | (v != v) | (code < 0))
                        best = tl.where(take, v, best)
                        code = tl.where(take, a * KMAX + b, code)
                tl.store(codes + r * skh + q * skw, code.to(tl.uint8), mask=live)


@triton.jit(do_not_specialize=["H", "W", "HM", "WM", "PMAX"])
def _max_blur_backward_kernel(
    g_ptr,
    codes_ptr,
    gx_ptr,
    ri_ptr,
    rw_ptr,
    ci_ptr,
    cw_ptr,
    C,
    H,
    W,
    HM,
    WM,
    sgn,
    sgc,
    sgh,
    sgw,
    skn,
    skc,
    skh,
    skw,
    sxn,
    sxc,
    sxh,
    sxw,
    PMAX,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """gx[p,q] = sum_{a,b} [codes[r,c] == a*KMAX+b] * gm[r,c], r = p-a+PMAX, c = q-b+PMAX.

    gm (the blur's gradient on the max map) is gathered on the fly through the adjoint tables; it is
    never stored. Deterministic: every gx element is owned by one program, no atomics.
    """
    n, c, p, q = _tile_coords(C, H, W, BC, BH, BW)
    c_ok = c < C
    ok = c_ok & (p < H) & (q < W)
    g_base = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    k_base = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * skc
    acc = tl.zeros(ok.shape, ACC)
    for a in tl.static_range(KMAX):
        r = p - a + PMAX
        r_ok = (r >= 0) & (r < HM)
        for b in tl.static_range(KMAX):
            cc = q - b + PMAX
            c_in = (cc >= 0) & (cc < WM)
            code = tl.load(k_base + r * skh + cc * skw, mask=ok & r_ok & c_in, other=255).to(tl.int32)
            hit = ok & r_ok & c_in & (code == a * KMAX + b)
            acc += _separable_sum(
                g_base, r, r_ok, cc, c_in, hit, ri_ptr, rw_ptr, ci_ptr, cw_ptr, 0, 0, sgh, sgw, 0, KH, KW, 0, ACC
            )
    gx = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + p * sxh + q * sxw
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=ok)


def _channels_inner(t: torch.Tensor) -> bool:
    return t.size(1) > 1 and t.stride(1) == 1


def _acc_dtype(t: torch.Tensor):
    """fp64 stays fp64 (gradcheck); everything else accumulates in fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _grid(n: int, c: int, h: int, w: int, bc: int, bh: int, bw: int) -> tuple[int]:
    return (n * triton.cdiv(c, bc) * triton.cdiv(h, bh) * triton.cdiv(w, bw),)


def blur_gather(x: torch.Tensor, rows: tuple, cols: tuple, out: torch.Tensor) -> None:
    """``out = R_rows x R_cols^T`` per (n, c) plane, for 4-D x and out of any strides."""
    _gather(x, rows, cols, out, None, 0, 0, 1, 1)


def max_blur_forward(
    x: torch.Tensor,
    kmax: int,
    pmax: int,
    stride: tuple[int, int],
    rows: tuple,
    cols: tuple,
    out: torch.Tensor,
    codes: torch.Tensor,
) -> None:
    """``out = gather(maxmap(x))`` and the argmax ``codes`` of every max-map position."""
    _gather(x, rows, cols, out, codes, kmax, pmax, stride[0], stride[1])


def _gather(x, rows, cols, out, codes, kmax, pmax, stride_h, stride_w) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    if out.numel() == 0:
        return
    (ri, rw), (ci, cw) = rows, cols
    hm, wm = (codes.shape[2], codes.shape[3]) if codes is not None else (h, w)
    own_h = max(stride_h, hm - stride_h * (ho - 1), 1) if codes is not None else 1
    own_w = max(stride_w, wm - stride_w * (wo - 1), 1) if codes is not None else 1
    bc, bh, bw, warps = _tile(
        c, ho, wo, _channels_inner(x), x.element_size(), MAX_BLUR_VECTOR if codes is not None else 16
    )
    k_strides = codes.stride() if codes is not None else (0, 0, 0, 0)
    _gather_kernel[_grid(n, c, ho, wo, bc, bh, bw)](
        x,
        out,
        codes if codes is not None else out,
        ri,
        rw,
        ci,
        cw,
        c,
        h,
        w,
        ho,
        wo,
        hm,
        wm,
        *x.stride(),
        *out.stride(),
        *k_strides,
        stride_h,
        stride_w,
        pmax,
        KH=ri.shape[1],
        KW=ci.shape[1],
        KMAX=kmax,
        OWN_H=own_h,
        OWN_W=own_w,
        ACC=_acc_dtype(x),
        BC=bc,
        BH=bh,
        BW=bw,
        num_warps=warps,
    )


def max_blur_backward(
    grad: torch.Tensor,
    codes: torch.Tensor,
    kmax: int,
    pmax: int,
    rows: tuple,
    cols: tuple,
    grad_input: torch.Tensor,
) -> None:
    """Gradient of max-blur w.r.t. its input; ``rows``/``cols`` are adjoint tables on the max map."""
    n, c, h, w = grad_input.shape
    if grad_input.numel() == 0:
        return
    (ri, rw), (ci, cw) = rows, cols
    bc, bh, bw, warps = _tile(c, h, w, _channels_inner(grad_input), grad_input.element_size(), MAX_BLUR_VECTOR)
    _max_blur_backward_kernel[_grid(n, c, h, w, bc, bh, bw)](
        grad,
        codes,
        grad_input,
        ri,
        rw,
        ci,
        cw,
        c,
        h,
        w,
        codes.shape[2],
        codes.shape[3],
        *grad.stride(),
        *codes.stride(),
        *grad_input.stride(),
        pmax,
        KH=ri.shape[1],
        KW=ci.shape[1],
        KMAX=kmax,
        ACC=_acc_dtype(grad),
        BC=bc,
        BH=bh,
        BW=bw,
        num_warps=warps,
    )
