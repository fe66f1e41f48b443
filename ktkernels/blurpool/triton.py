"""Triton kernels for the blur-pool family and their launchers.

Each program computes a (BC, BH, BW) tile of one image: BC channels x BH rows x BW columns.
The launcher picks the tile from the memory layout. NCHW-like inputs use a wide BW, channels_last
inputs a wide BC, so that the innermost memory axis is the fastest tile axis (Triton orders the tile
by the contiguity it can prove). All index maths of padding sits in the tables of ``geometry.py``:

- ``_gather_kernel``: (index, weight) tables, so the blur forward, its backward and BlurPool1d are one
  gather kernel;
- ``_max_blur_kernel``: banded tables (a base and contiguous weights per output), one output row per
  program, so that each x element of the window is loaded once and the max map is formed in registers;
- ``_max_blur_backward_kernel``: routing tables (per input position, the band of output gradients that
  reaches its max-pool window slots), one input row per program; the argmax codes select the slots;
- ``_planar_*`` kernels: the same ops for planar rows (unit W stride, W stride of the op 1, 2 or 4). Their
  columns come as window tables (``geometry.window_table``): output j reads columns s*j + offset + d, so a row
  is loaded as contiguous groups of s columns and split into its s phases in registers.

Maths is fp32 (fp64 for fp64 inputs) right after every load: bf16 arithmetic is also wrong under the
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import MAX_FILT_SIZE, Axis, device_table, window_table


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


NUM_WARPS = 4
# Elements per thread of the max-blur kernels: their window of x values, maxes and codes lives in registers,
# and 2 per thread keeps them spill-free at 16 resident warps per SM (python -m ktkernels.bench codegen).
MAX_BLUR_PER_THREAD = 2


def _tile(channels: int, rows: int, cols: int, channels_inner: bool, per_thread: int) -> tuple[int, int, int, int]:
    """(BC, BH, BW, num_warps) for an output region of channels x rows x cols, ``per_thread`` elements per thread.

    channels_inner tiles put a thread's elements on neighbouring channels, so that each tap is one vector
    load; planar tiles put them along W. Registers grow with the elements per thread times the unrolled taps,
    and cut the resident warps (benchmarks/NOTES.md, "codegen").
    """
    elements = 32 * NUM_WARPS * per_thread
    if channels_inner:
        bc = min(_next_pow2(channels), 16 * per_thread)
        bw = min(_next_pow2(cols), max(1, elements // bc))
        bh = min(_next_pow2(rows), max(1, elements // (bc * bw)))
    else:
        bw = min(_next_pow2(cols), 64)
        bh = min(_next_pow2(rows), max(1, elements // bw))
        bc = min(_next_pow2(channels), max(1, elements // (bh * bw)))
    return bc, bh, bw, NUM_WARPS


def _blur_per_thread(t: torch.Tensor, taps: int) -> int:
    """Elements per thread of the blur gather for input ``t`` and ``taps`` = KH * KW unrolled taps.

    One 16-byte vector (4 fp32, 8 bf16) when channels are inner, 4 elements (2 fp64) for planar gathers;
    fewer for 5x5 taps and more (wide filters at stride 1), whose taps times elements would not fit in the
    registers.
    """
    size = t.element_size()
    vector = max(16 // size, 1) if _channels_inner(t) else (4 if size <= 4 else 2)
    budget = max(1, 128 // taps)
    return min(vector, 1 << (budget.bit_length() - 1))


@triton.jit
def _tile_blocks(C, HO, WO, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """This program's image index and its channel, row and column block numbers (``_grid`` order)."""
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
    return n, cb, hb, wb


@triton.jit
def _tile_coords(C, HO, WO, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """This program's image index and (BC,1,1), (1,BH,1), (1,1,BW) channel/row/column indices."""
    n, cb, hb, wb = _tile_blocks(C, HO, WO, BC, BH, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    i = hb * BH + tl.arange(0, BH)[None, :, None]
    j = wb * BW + tl.arange(0, BW)[None, None, :]
    return n, c, i, j


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
    s_h,
    s_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC: tl.constexpr,
):
    """sum_u sum_v rw[rows,u] * cw[cols,v] * src[ri[rows,u], ci[cols,v]] for the tensor at ``base``, in ACC.

    Taps with weight 0 (zero padding, unused adjoint slots) are not loaded, so inf/NaN elsewhere cannot leak.
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
            line += cw * tl.load(base + r * s_h + q * s_w, mask=live, other=0.0).to(ACC)
        acc += rw * line
    return acc


# Spatial sizes are not specialised (fewer recompiles across shapes). Strides and C are: a unit inner
# stride proves contiguity, and C % 16 == 0 proves the channel mask constant over a vector; without the
# latter every channels_last tap compiled to scalar loads (benchmarks/NOTES.md, "codegen").
@triton.jit(do_not_specialize=["H", "W", "HO", "WO"])
def _gather_kernel(
    x_ptr,
    out_ptr,
    ri_ptr,
    rw_ptr,
    ci_ptr,
    cw_ptr,
    C,
    H,
    W,
    HO,
    WO,
    sxn,
    sxc,
    sxh,
    sxw,
    son,
    soc,
    soh,
    sow,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """out = R_rows x R_cols^T per plane, the rows of R given as (index, weight) tables."""
    n, c, i, j = _tile_coords(C, HO, WO, BC, BH, BW)
    i_ok = i < HO
    j_ok = j < WO
    ok = (c < C) & i_ok & j_ok
    base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    acc = _separable_sum(base, i, i_ok, j, j_ok, ok, ri_ptr, rw_ptr, ci_ptr, cw_ptr, sxh, sxw, KH, KW, ACC)
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + i * soh + j * sow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _phases(g, S: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """The S phases of g (BC, BH, BW*S): phase r is g[..., S*w + r], shape (BC, BH, BW). Register-only."""
    if S == 1:
        return (g,)
    elif S == 2:
        even, odd = tl.split(tl.reshape(g, (BC, BH, BW, 2)))
        return even, odd
    else:
        # (w, a, b) with r = 2a + b: split b, then a.
        low, high = tl.split(tl.reshape(g, (BC, BH, BW, 2, 2)))
        p0, p2 = tl.split(low)
        p1, p3 = tl.split(high)
        return p0, p1, p2, p3


@triton.jit
def _interleave(parts, S: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Inverse of ``_phases``: S tensors (BC, BH, BW) -> (BC, BH, BW*S) with parts[r] at S*w + r."""
    if S == 1:
        return parts[0]
    elif S == 2:
        return tl.reshape(tl.join(parts[0], parts[1]), (BC, BH, BW * 2))
    else:
        return tl.reshape(tl.join(tl.join(parts[0], parts[2]), tl.join(parts[1], parts[3])), (BC, BH, BW * 4))


# Planar kernels: the plane geometry (W, WO and the plane strides) is compile-time, so that Triton can prove
# the alignment of every row and the constancy of the border masks over a vector; with runtime sizes every
# load along W compiled to scalar loads (benchmarks/NOTES.md, "planar"). A network has a handful of shapes.
@triton.jit(do_not_specialize=["H", "HO"])
def _planar_blur_kernel(
    x_ptr,
    out_ptr,
    rw_ptr,
    cw_ptr,
    C,
    H,
    HO,
    sxn,
    son,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    SOC: tl.constexpr,
    SOH: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    SH: tl.constexpr,
    OFFSET_H: tl.constexpr,
    DH: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """out[i, j] = sum_e rw[e, i] sum_d cw[d, j] x[SH*i + OFFSET_H + e, S*j + OFFSET + d], for planar rows.

    Both axes come as window tables (geometry.window_table). Window position S*j + OFFSET + d is phase
    (OFFSET + d) % S of the S-element group j + (OFFSET + d) // S, so for each row the program loads whole
    groups for BW consecutive outputs (BW*S contiguous elements per group offset) and splits the phases in
    registers, instead of one stride-S gather per tap.
    """
    n, cb, hb, wb = _tile_blocks(C, HO, WO, BC, BH, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    i = hb * BH + tl.arange(0, BH)[None, :, None]
    j = wb * BW + tl.arange(0, BW)[None, None, :]
    lane = tl.arange(0, BW * S)[None, None, :]
    c_ok = c < C
    i_ok = i < HO
    j_ok = j < WO
    col_weights = ()
    for d in tl.static_range(D):
        col_weights = col_weights + (tl.load(cw_ptr + d * WO + j, mask=j_ok, other=0.0),)
    plane = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    acc = tl.zeros((BC, BH, BW), ACC)
    for e in tl.static_range(DH):
        r = SH * i + (OFFSET_H + e)
        rw = tl.load(rw_ptr + e * HO + i, mask=i_ok, other=0.0)
        row_ok = c_ok & (rw != 0.0) & (r >= 0) & (r < H)
        row = plane + r * SXH
        phases = ()  # phases[k]: column S*j + S*(OFFSET // S) + k, from the first group the window needs
        for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
            cols = (wb * BW + q) * S + lane
            group = tl.load(row + cols, mask=row_ok & (cols >= 0) & (cols < W), other=0.0)
            phases = phases + _phases(group.to(ACC), S, BC, BH, BW)
        line = tl.zeros((BC, BH, BW), ACC)
        for d in tl.static_range(D):
            w = col_weights[d]
            line += w * tl.where(w != 0.0, phases[OFFSET + d - OFFSET // S * S], 0.0)
        acc += rw * line
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * SOC + i * SOH + j
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=c_ok & i_ok & j_ok)


@triton.jit(do_not_specialize=["H", "HO"])
def _planar_blur_adjoint_kernel(
    g_ptr,
    gx_ptr,
    ai_ptr,
    aw_ptr,
    cw_ptr,
    C,
    H,
    HO,
    sgn,
    sxn,
    SGC: tl.constexpr,
    SGH: tl.constexpr,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    KA: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """gx[p, S*u + r] = sum_m aw[p, m] sum_q cw[S*q + r - OFFSET, u - q] g[ai[p, m], u - q]: the adjoint of
    ``_planar_blur_kernel``, rows through the adjoint table.

    Each program writes BW groups of S neighbouring gx columns (group u covers columns S*u .. S*u + S - 1):
    per group offset q it loads the gradient row at u - q (contiguous in u), forms the S phases, and
    interleaves them in registers into one contiguous store. Every gx element has one writer: deterministic.
    """
    n, cb, hb, ub = _tile_blocks(C, H, tl.cdiv(W, S), BC, BH, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    p = hb * BH + tl.arange(0, BH)[None, :, None]
    u = ub * BW + tl.arange(0, BW)[None, None, :]
    c_ok = c < C
    p_ok = p < H
    plane = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * SGC
    rows = ()
    row_weights = ()
    for m in tl.static_range(KA):
        rows = rows + (tl.load(ai_ptr + p * KA + m, mask=p_ok, other=0),)
        row_weights = row_weights + (tl.load(aw_ptr + p * KA + m, mask=p_ok, other=0.0),)
    lines = ()  # the row-combined gradient at output column u - q, for q from OFFSET // S
    for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
        col_ok = (u - q >= 0) & (u - q < WO)
        line = tl.zeros((BC, BH, BW), ACC)
        for m in tl.static_range(KA):
            live = c_ok & (row_weights[m] != 0.0) & col_ok
            line += row_weights[m] * tl.load(plane + rows[m] * SGH + (u - q), mask=live, other=0.0).to(ACC)
        lines = lines + (line,)
    parts = ()
    for r in tl.static_range(S):
        part = tl.zeros((BC, BH, BW), ACC)
        for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
            if q * S + r - OFFSET >= 0:  # window position d = q*S + r - OFFSET of output u - q
                if q * S + r - OFFSET < D:
                    col_ok = (u - q >= 0) & (u - q < WO)
                    w = tl.load(cw_ptr + (q * S + r - OFFSET) * WO + (u - q), mask=col_ok, other=0.0)
                    part += w * tl.where(w != 0.0, lines[q - OFFSET // S], 0.0)
        parts = parts + (part,)
    gx = _interleave(parts, S, BC, BH, BW)
    cols = ub * BW * S + tl.arange(0, BW * S)[None, None, :]
    out = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC + p * SXH + cols
    tl.store(out, gx.to(gx_ptr.dtype.element_ty), mask=c_ok & p_ok & (cols < W))


@triton.jit
def _argmax_step(best, code, v, valid, index):
    """torch.max_pool2d's scan: v (at ``index``) replaces best if v > best or v is NaN; the first valid v always."""
    take = valid & ((v > best) | (v != v) | (code < 0))
    return tl.where(take, v, best), tl.where(take, index, code)


@triton.jit
def _owns(p, out_index, stride, out_size, size):
    """Whether output ``out_index`` writes the code of max-map position ``p`` (geometry.codes_per_owner)."""
    first = out_index * stride
    return (p >= first) & ((p < first + stride) | (out_index == out_size - 1)) & (p < size)


@triton.jit
def _append_row_maxes(row_max, row_arg, values, inside, DW: tl.constexpr, KMAX: tl.constexpr):
    """Append one x row's maxima: for each band column d, the max of values[d : d + KMAX] and its index b
    (-1: none in range). A band column's maximum at x row rho then sits at row_max[rho * DW + d]."""
    for d in tl.static_range(DW):
        best = tl.full(values[0].shape, float("-inf"), values[0].dtype)
        code = tl.full(values[0].shape, -1, tl.int32)
        for b in tl.static_range(KMAX):
            best, code = _argmax_step(best, code, values[d + b], inside[d + b], b)
        row_max = row_max + (best,)
        row_arg = row_arg + (code,)
    return row_max, row_arg


@triton.jit
def _band_row(row_max, row_arg, col_weights, E: tl.constexpr, DW: tl.constexpr, KMAX: tl.constexpr):
    """Max-map row E of the band, blurred along the columns, and its codes: (sum_d col_weights[d] * m[d],
    (code_0, ..., code_{DW-1})), where m[d] is the max down the KMAX row maxima from x row E at band column d and
    code_d = a * KMAX + b its argmax in the window."""
    line = tl.zeros(row_max[0].shape, row_max[0].dtype)
    codes = ()
    for d in tl.static_range(DW):
        best = tl.full(line.shape, float("-inf"), line.dtype)
        code = tl.full(line.shape, -1, tl.int32)
        for a in tl.static_range(KMAX):
            b = row_arg[(E + a) * DW + d]
            best, code = _argmax_step(best, code, row_max[(E + a) * DW + d], b >= 0, a * KMAX + b)
        line += col_weights[d] * tl.where(col_weights[d] != 0.0, best, 0.0)
        codes = codes + (code,)
    return line, codes


@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "HM", "WM", "STRIDE_H", "STRIDE_W", "PMAX"])
def _max_blur_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    rbase_ptr,
    rband_ptr,
    cbase_ptr,
    cband_ptr,
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
    DH: tl.constexpr,
    DW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """out[i, j] = sum_e sum_d rband[i, e] cband[j, d] m[rbase[i] + e, cbase[j] + d], and the codes it owns.

    m is the stride-1 KMAX x KMAX max map of x (padding PMAX, out-of-range excluded). One output row per
    program: the x rows rbase[i] + e + a - PMAX and columns cbase[j] + d + b - PMAX of the window are loaded
    once each, (DH + KMAX - 1) x (DW + KMAX - 1) loads per output instead of DH * DW * KMAX^2. The max is
    taken along the row first, then down the column, which picks the same element as torch's row-major
    scan. Every max-map position in the window whose code this output owns is stored, so each code is
    written exactly once grid-wide (the bands cover the owned positions: geometry.banded_table).
    """
    n, c, i, j = _tile_coords(C, HO, WO, BC, 1, BW)
    j_ok = j < WO
    ok = (c < C) & j_ok
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    k_base = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * skc
    rbase = tl.load(rbase_ptr + i)
    cbase = tl.load(cbase_ptr + j, mask=j_ok, other=0)
    col_weights = ()
    for d in tl.static_range(DW):
        col_weights = col_weights + (tl.load(cband_ptr + j * DW + d, mask=j_ok, other=0.0),)
    acc = tl.zeros(ok.shape, ACC)
    row_max = ()  # flat tuples (Triton's compiler does not nest them): see _append_row_maxes
    row_arg = ()
    for rho in tl.static_range(DH + KMAX - 1):
        xr = rbase + (rho - PMAX)
        row_ok = ok & (xr >= 0) & (xr < H)
        values = ()
        inside = ()
        for t in tl.static_range(DW + KMAX - 1):
            xc = cbase + (t - PMAX)
            valid = row_ok & (xc >= 0) & (xc < W)
            values = values + (tl.load(x_base + xr * sxh + xc * sxw, mask=valid, other=float("-inf")).to(ACC),)
            inside = inside + (valid,)
        row_max, row_arg = _append_row_maxes(row_max, row_arg, values, inside, DW, KMAX)
        if rho >= KMAX - 1:
            r = rbase + (rho - (KMAX - 1))
            owned = ok & _owns(r, i, STRIDE_H, HO, HM)
            line, codes = _band_row(row_max, row_arg, col_weights, rho - (KMAX - 1), DW, KMAX)
            for d in tl.static_range(DW):
                q = cbase + d
                tl.store(k_base + r * skh + q * skw, codes[d].to(tl.uint8), mask=owned & _owns(q, j, STRIDE_W, WO, WM))
            rw = tl.load(rband_ptr + i * DH + (rho - (KMAX - 1)))
            acc += rw * tl.where(rw != 0.0, line, 0.0)
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + i * soh + j * sow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["H", "HO", "HM", "STRIDE_H"])
def _planar_max_blur_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    rbase_ptr,
    rband_ptr,
    cw_ptr,
    C,
    H,
    HO,
    HM,
    sxn,
    son,
    skn,
    STRIDE_H,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    SOC: tl.constexpr,
    SOH: tl.constexpr,
    SKC: tl.constexpr,
    SKH: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    WM: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    PMAX: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """``_max_blur_kernel`` for planar rows (unit W stride): the columns come from the window table
    (geometry.window_table with the owned codes covered), ``cw[d, j]`` at max-map column S*j + OFFSET + d.

    The x columns of output j's window, S*j + OFFSET - PMAX + t, are phases of S-element groups, so each x row
    is loaded as whole groups for BW consecutive outputs (contiguous vectors) and split in registers, instead of
    DW + KMAX - 1 stride-S gathers. Rows, maxima, codes and the blur are those of ``_max_blur_kernel``.
    """
    n, cb, i, wb = _tile_blocks(C, HO, WO, BC, 1, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    j = wb * BW + tl.arange(0, BW)[None, None, :]
    lane = tl.arange(0, BW * S)[None, None, :]
    c_ok = c < C
    ok = c_ok & (j < WO)
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    k_base = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * SKC
    rbase = tl.load(rbase_ptr + i)
    cbase = S * j + OFFSET
    col_weights = ()
    for d in tl.static_range(DW):
        col_weights = col_weights + (tl.load(cw_ptr + d * WO + j, mask=j < WO, other=0.0),)
    acc = tl.zeros(ok.shape, ACC)
    row_max = ()
    row_arg = ()
    for rho in tl.static_range(DH + KMAX - 1):
        xr = rbase + (rho - PMAX)
        row_in = (xr >= 0) & (xr < H)
        x_row = x_base + xr * SXH
        # phases[k] is x column S*j + S*((OFFSET - PMAX) // S) + k: the groups from the first one the window needs.
        phases = ()
        for q in tl.static_range((OFFSET - PMAX) // S, (OFFSET - PMAX + DW + KMAX - 2) // S + 1):
            cols = (wb * BW + q) * S + lane
            group = tl.load(x_row + cols, mask=c_ok & row_in & (cols >= 0) & (cols < W), other=float("-inf"))
            phases = phases + _phases(group.to(ACC), S, BC, 1, BW)
        values = ()
        inside = ()
        for t in tl.static_range(DW + KMAX - 1):
            xc = cbase + (t - PMAX)
            values = values + (phases[OFFSET - PMAX + t - (OFFSET - PMAX) // S * S],)
            inside = inside + (ok & row_in & (xc >= 0) & (xc < W),)
        row_max, row_arg = _append_row_maxes(row_max, row_arg, values, inside, DW, KMAX)
        if rho >= KMAX - 1:
            r = rbase + (rho - (KMAX - 1))
            k_row = k_base + r * SKH
            owned = c_ok & _owns(r, i, STRIDE_H, HO, HM)
            line, codes = _band_row(row_max, row_arg, col_weights, rho - (KMAX - 1), DW, KMAX)
            # Output j owns the codes of columns S*j + p, p < S (window position p - OFFSET): interleaved, they
            # are one contiguous store. The last output also owns the columns past those (geometry.codes_per_owner).
            own = ()
            for p in tl.static_range(S):
                own = own + (codes[p - OFFSET],)
            cols = wb * BW * S + lane
            own_ok = owned & (cols < S * WO) & (cols < WM)
            tl.store(k_row + cols, _interleave(own, S, BC, 1, BW).to(tl.uint8), mask=own_ok)
            for d in tl.static_range(S - OFFSET, DW):
                q = cbase + d
                tl.store(k_row + q, codes[d].to(tl.uint8), mask=owned & ok & (j == WO - 1) & (q < WM))
            rw = tl.load(rband_ptr + i * DH + (rho - (KMAX - 1)))
            acc += rw * tl.where(rw != 0.0, line, 0.0)
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * SOC + i * SOH + j
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "HM", "WM", "PMAX"])
def _max_blur_backward_kernel(
    g_ptr,
    codes_ptr,
    gx_ptr,
    rbase_ptr,
    rweight_ptr,
    cbase_ptr,
    cweight_ptr,
    C,
    H,
    W,
    HO,
    WO,
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
    DH: tl.constexpr,
    DW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """gx[p, q] = sum_{a,b} [codes[r, c] == a*KMAX + b] gm[r, c] with r = p - a + PMAX, c = q - b + PMAX.

    gm (the blur's gradient on the max map) is formed from the output gradient through the routing tables
    (geometry.routing_table): input row p reads the DH gradient rows from rbase[p] once, column q the DW
    columns from cbase[q], and every window slot (a, b) weighs the same DH x DW values. One input row per
    program; every gx element is written by one program, no atomics: deterministic.
    """
    n, c, p, q = _tile_coords(C, H, W, BC, 1, BW)
    q_ok = q < W
    ok = (c < C) & q_ok
    g_base = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    k_base = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * skc
    rbase = tl.load(rbase_ptr + p)
    cbase = tl.load(cbase_ptr + q, mask=q_ok, other=0)
    # Slot weights: rows (a, e) at a * DH + e, columns (b, f) at b * DW + f.
    row_weights = ()
    col_weights = ()
    for a in tl.static_range(KMAX):
        for e in tl.static_range(DH):
            row_weights = row_weights + (tl.load(rweight_ptr + (p * KMAX + a) * DH + e),)
        for f in tl.static_range(DW):
            col_weights = col_weights + (tl.load(cweight_ptr + (q * KMAX + a) * DW + f, mask=q_ok, other=0.0),)
    grads = ()  # grad[rbase + e, cbase + f] at e * DW + f
    for e in tl.static_range(DH):
        gr = rbase + e
        row_ok = ok & (gr < HO)
        for f in tl.static_range(DW):
            gc = cbase + f
            grads = grads + (tl.load(g_base + gr * sgh + gc * sgw, mask=row_ok & (gc < WO), other=0.0).to(ACC),)
    acc = tl.zeros(ok.shape, ACC)
    for a in tl.static_range(KMAX):
        r = p - a + PMAX
        r_ok = (r >= 0) & (r < HM)
        for b in tl.static_range(KMAX):
            cc = q - b + PMAX
            live = ok & r_ok & (cc >= 0) & (cc < WM)
            code = tl.load(k_base + r * skh + cc * skw, mask=live, other=255).to(tl.int32)
            gm = tl.zeros(ok.shape, ACC)
            for e in tl.static_range(DH):
                line = tl.zeros(ok.shape, ACC)
                for f in tl.static_range(DW):
                    wc = col_weights[b * DW + f]
                    line += tl.where(wc != 0.0, wc * grads[e * DW + f], 0.0)
                wr = row_weights[a * DH + e]
                gm += tl.where(wr != 0.0, wr * line, 0.0)
            acc += tl.where(live & (code == a * KMAX + b), gm, 0.0)
    gx = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + p * sxh + q * sxw
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["H", "HO", "HM"])
def _planar_max_blur_backward_kernel(
    g_ptr,
    codes_ptr,
    gx_ptr,
    rbase_ptr,
    rweight_ptr,
    cw_ptr,
    C,
    H,
    HO,
    HM,
    sgn,
    skn,
    sxn,
    SGC: tl.constexpr,
    SGH: tl.constexpr,
    SKC: tl.constexpr,
    SKH: tl.constexpr,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    WM: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    PMAX: tl.constexpr,
    F_MIN: tl.constexpr,
    F_MAX: tl.constexpr,
    Q_MIN: tl.constexpr,
    Q_MAX: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KMAX: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """``_max_blur_backward_kernel`` for planar rows: rows through the routing table, columns through the
    forward's window table.

    Input column S*u + rho sits in slot b of the max-map column m = S*u + rho - b + PMAX, whose blur gradient
    is sum_f cw[d, u - f] g[u - f] with d = S*f + rho - b + PMAX - OFFSET (F_MIN <= f <= F_MAX). So the
    program loads the gradient at u - f and the codes' column groups (Q_MIN..Q_MAX) contiguously for BW groups
    of S input columns, forms each phase rho, and interleaves the phases into one contiguous store.
    """
    n, cb, p, ub = _tile_blocks(C, H, tl.cdiv(W, S), BC, 1, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    u = ub * BW + tl.arange(0, BW)[None, None, :]
    lane = tl.arange(0, BW * S)[None, None, :]
    c_ok = c < C
    g_base = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * SGC
    k_base = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * SKC
    rbase = tl.load(rbase_ptr + p)
    row_weights = ()  # (a, e) at a * DH + e
    for a in tl.static_range(KMAX):
        for e in tl.static_range(DH):
            row_weights = row_weights + (tl.load(rweight_ptr + (p * KMAX + a) * DH + e),)
    grads = ()  # g[rbase + e, u - f] at e * (F_MAX - F_MIN + 1) + f - F_MIN
    col_weights = ()  # cw[d, u - f] at (f - F_MIN) * DW + d; the pairs no phase uses are never loaded
    for f in tl.static_range(F_MIN, F_MAX + 1):
        for d in tl.static_range(DW):
            col_weights = col_weights + (tl.load(cw_ptr + d * WO + (u - f), mask=(u >= f) & (u - f < WO), other=0.0),)
    for e in tl.static_range(DH):
        row_ok = c_ok & (rbase + e < HO)
        for f in tl.static_range(F_MIN, F_MAX + 1):
            live = row_ok & (u >= f) & (u - f < WO)
            grads = grads + (tl.load(g_base + (rbase + e) * SGH + (u - f), mask=live, other=0.0).to(ACC),)
    codes = ()  # code at max-map column S*u + k, row p - a + PMAX, at a * S * (Q_MAX - Q_MIN + 1) + k - S * Q_MIN
    for a in tl.static_range(KMAX):
        r = p - a + PMAX
        r_ok = (r >= 0) & (r < HM)
        for q in tl.static_range(Q_MIN, Q_MAX + 1):
            cols = (ub * BW + q) * S + lane
            group = tl.load(k_base + r * SKH + cols, mask=c_ok & r_ok & (cols >= 0) & (cols < WM), other=255)
            codes = codes + _phases(group.to(tl.int32), S, BC, 1, BW)
    parts = ()
    for rho in tl.static_range(S):
        acc = tl.zeros((BC, 1, BW), ACC)
        for a in tl.static_range(KMAX):
            for b in tl.static_range(KMAX):
                code = codes[a * S * (Q_MAX - Q_MIN + 1) + rho - b + PMAX - S * Q_MIN]
                gm = tl.zeros((BC, 1, BW), ACC)
                for e in tl.static_range(DH):
                    line = tl.zeros((BC, 1, BW), ACC)
                    for f in tl.static_range(F_MIN, F_MAX + 1):
                        if S * f + rho - b + PMAX - OFFSET >= 0:  # window position d of output u - f
                            if S * f + rho - b + PMAX - OFFSET < DW:
                                w = col_weights[(f - F_MIN) * DW + S * f + rho - b + PMAX - OFFSET]
                                line += w * tl.where(w != 0.0, grads[e * (F_MAX - F_MIN + 1) + f - F_MIN], 0.0)
                    wr = row_weights[a * DH + e]
                    gm += wr * tl.where(wr != 0.0, line, 0.0)
                acc += tl.where(code == a * KMAX + b, gm, 0.0)
        parts = parts + (acc,)
    cols = ub * BW * S + lane
    gx = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC + p * SXH + cols
    tl.store(gx, _interleave(parts, S, BC, 1, BW).to(gx_ptr.dtype.element_ty), mask=c_ok & (cols < W))


def _channels_inner(t: torch.Tensor) -> bool:
    return t.size(1) > 1 and t.stride(1) == 1


def _acc_dtype(t: torch.Tensor):
    """fp64 stays fp64 (gradcheck); everything else accumulates in fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _grid(n: int, c: int, h: int, w: int, bc: int, bh: int, bw: int) -> tuple[int]:
    return (n * triton.cdiv(c, bc) * triton.cdiv(h, bh) * triton.cdiv(w, bw),)


# Column strides the planar kernels take (the phase split needs a power of two); windows wider than this
# (only pads far from the anchors' make them) go to the gather kernel.
PLANAR_STRIDES = (1, 2, 4)
PLANAR_MAX_WINDOW = 2 * MAX_FILT_SIZE


def _planar(x: torch.Tensor, out: torch.Tensor, axes: tuple[Axis, Axis]) -> bool:
    """Whether the planar kernels take this call: unit W strides on both sides, a power-of-two W stride."""
    return (
        not _channels_inner(x)
        and x.stride(3) == 1
        and out.stride(3) == 1
        and axes[1].stride in PLANAR_STRIDES
        and all(window_table(axis)[1].shape[0] <= PLANAR_MAX_WINDOW for axis in axes)
    )


def blur(x: torch.Tensor, axes: tuple[Axis, Axis], adjoint: bool, out: torch.Tensor) -> None:
    """``out = R_h x R_w^T`` (forward) or ``R_h^T x R_w`` (``adjoint``) per (n, c) plane, for 4-D x and out.

    ``axes`` are the (row, column) axes of the forward op. Planar inputs with unit W stride take the
    planar kernels, everything else (channels_last, strided views, stride 3) the gather kernel.
    """
    if out.numel() == 0:
        return
    row_axis, col_axis = axes
    table = "adjoint" if adjoint else "forward"
    if not _planar(x, out, axes):
        blur_gather(x, device_table(table, row_axis, x.device), device_table(table, col_axis, x.device), out)
        return
    cols = device_table("window", col_axis, x.device)
    if adjoint:
        _planar_adjoint(x, device_table("adjoint", row_axis, x.device), cols, col_axis.stride, out)
    else:
        _planar_forward(x, device_table("window", row_axis, x.device), row_axis.stride, cols, col_axis.stride, out)


def _planar_per_thread(t: torch.Tensor, stride: int) -> int:
    """Groups of ``stride`` columns per thread: one 16-byte vector of a planar row, at most 4 groups.

    The cap matters at stride 1 in 16-bit dtypes: every group offset but one is misaligned there, so 8 groups
    per thread compiled to scalar loads at 253 registers (python -m ktkernels.bench codegen).
    """
    return max(1, min(4, 16 // (t.element_size() * stride)))


def _planar_constexprs(src: torch.Tensor, w: int, wo: int, stride: int, cols: tuple, tile: tuple) -> dict:
    """The launch options both planar kernels share: the column geometry, the window and the tile."""
    offset, window = cols
    bc, bh, bw, warps = tile
    return dict(W=w, WO=wo, S=stride, OFFSET=offset, D=window.shape[0], ACC=_acc_dtype(src), BC=bc, BH=bh, BW=bw,
                num_warps=warps)  # fmt: skip


def _planar_forward(x: torch.Tensor, rows: tuple, row_stride: int, cols: tuple, stride: int, out) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    row_offset, row_window = rows
    tile = _tile(c, ho, wo, False, _planar_per_thread(x, stride))
    _planar_blur_kernel[_grid(n, c, ho, wo, *tile[:3])](
        x,
        out,
        row_window,
        cols[1],
        c,
        h,
        ho,
        x.stride(0),
        out.stride(0),
        SXC=x.stride(1),
        SXH=x.stride(2),
        SOC=out.stride(1),
        SOH=out.stride(2),
        SH=row_stride,
        OFFSET_H=row_offset,
        DH=row_window.shape[0],
        **_planar_constexprs(x, w, wo, stride, cols, tile),
    )


def _planar_adjoint(grad: torch.Tensor, rows: tuple, cols: tuple, stride: int, gx) -> None:
    n, c, h, w = gx.shape
    ho, wo = grad.shape[2:]
    ai, aw = rows
    groups = triton.cdiv(w, stride)
    tile = _tile(c, h, groups, False, _planar_per_thread(gx, stride))
    _planar_blur_adjoint_kernel[_grid(n, c, h, groups, *tile[:3])](
        grad,
        gx,
        ai,
        aw,
        cols[1],
        c,
        h,
        ho,
        grad.stride(0),
        gx.stride(0),
        SGC=grad.stride(1),
        SGH=grad.stride(2),
        SXC=gx.stride(1),
        SXH=gx.stride(2),
        KA=ai.shape[1],
        **_planar_constexprs(grad, w, wo, stride, cols, tile),
    )


def blur_gather(x: torch.Tensor, rows: tuple, cols: tuple, out: torch.Tensor) -> None:
    """``out = R_rows x R_cols^T`` per (n, c) plane through (index, weight) tables, for 4-D x and out of any strides."""
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    (ri, rw), (ci, cw) = rows, cols
    bc, bh, bw, warps = _tile(c, ho, wo, _channels_inner(x), _blur_per_thread(x, ri.shape[1] * ci.shape[1]))
    _gather_kernel[_grid(n, c, ho, wo, bc, bh, bw)](
        x,
        out,
        ri,
        rw,
        ci,
        cw,
        c,
        h,
        w,
        ho,
        wo,
        *x.stride(),
        *out.stride(),
        KH=ri.shape[1],
        KW=ci.shape[1],
        ACC=_acc_dtype(x),
        BC=bc,
        BH=bh,
        BW=bw,
        num_warps=warps,
    )


def max_blur_forward(
    x: torch.Tensor, kmax: int, pmax: int, axes: tuple[Axis, Axis], out: torch.Tensor, codes: torch.Tensor
) -> None:
    """``out = R_rows maxmap(x) R_cols^T`` and the argmax ``codes`` of every max-map position.

    ``axes`` are the blur's (row, column) axes over the max map. Rows come as bands (geometry.banded_table);
    planar inputs take their columns as windows (``_planar_max_blur_kernel``), all others as bands.
    """
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    if out.numel() == 0:
        return
    row_axis, col_axis = axes
    rbase, rband = device_table("banded", row_axis, x.device)
    bc, _, bw, warps = _tile(c, 1, wo, _channels_inner(x), MAX_BLUR_PER_THREAD)
    grid = _grid(n, c, ho, wo, bc, 1, bw)
    if _planar(x, out, axes) and codes.stride(3) == 1:
        offset, window = device_table("window", col_axis, x.device, True)
        _planar_max_blur_kernel[grid](
            x,
            out,
            codes,
            rbase,
            rband,
            window,
            c,
            h,
            ho,
            codes.shape[2],
            x.stride(0),
            out.stride(0),
            codes.stride(0),
            row_axis.stride,
            SXC=x.stride(1),
            SXH=x.stride(2),
            SOC=out.stride(1),
            SOH=out.stride(2),
            SKC=codes.stride(1),
            SKH=codes.stride(2),
            W=w,
            WO=wo,
            WM=codes.shape[3],
            S=col_axis.stride,
            OFFSET=offset,
            PMAX=pmax,
            DH=rband.shape[1],
            DW=window.shape[0],
            KMAX=kmax,
            ACC=_acc_dtype(x),
            BC=bc,
            BW=bw,
            num_warps=warps,
        )
        return
    cbase, cband = device_table("banded", col_axis, x.device)
    _max_blur_kernel[grid](
        x,
        out,
        codes,
        rbase,
        rband,
        cbase,
        cband,
        c,
        h,
        w,
        ho,
        wo,
        codes.shape[2],
        codes.shape[3],
        *x.stride(),
        *out.stride(),
        *codes.stride(),
        row_axis.stride,
        col_axis.stride,
        pmax,
        DH=rband.shape[1],
        DW=cband.shape[1],
        KMAX=kmax,
        ACC=_acc_dtype(x),
        BC=bc,
        BW=bw,
        num_warps=warps,
    )


def max_blur_backward(
    grad: torch.Tensor,
    codes: torch.Tensor,
    kmax: int,
    pmax: int,
    axes: tuple[Axis, Axis],
    grad_input: torch.Tensor,
) -> None:
    """Gradient of max-blur w.r.t. its input. Rows through routing tables (geometry.routing_table); planar
    tensors take their columns from the forward's window table, all others from routing tables too."""
    n, c, h, w = grad_input.shape
    if grad_input.numel() == 0:
        return
    row_axis, col_axis = axes
    rbase, rweight = device_table("routing", row_axis, grad.device, kmax, pmax)
    if _planar(grad, grad_input, axes) and codes.stride(3) == 1:
        offset, window = device_table("window", col_axis, grad.device, True)
        s, dw = col_axis.stride, window.shape[0]
        groups = triton.cdiv(w, s)
        bc, _, bw, warps = _tile(c, 1, groups, False, MAX_BLUR_PER_THREAD)
        _planar_max_blur_backward_kernel[_grid(n, c, h, groups, bc, 1, bw)](
            grad,
            codes,
            grad_input,
            rbase,
            rweight,
            window,
            c,
            h,
            grad.shape[2],
            codes.shape[2],
            grad.stride(0),
            codes.stride(0),
            grad_input.stride(0),
            SGC=grad.stride(1),
            SGH=grad.stride(2),
            SKC=codes.stride(1),
            SKH=codes.stride(2),
            SXC=grad_input.stride(1),
            SXH=grad_input.stride(2),
            W=w,
            WO=grad.shape[3],
            WM=codes.shape[3],
            S=s,
            OFFSET=offset,
            PMAX=pmax,
            # Gradient columns u - f reach a window slot of input group u (see the kernel's docstring).
            F_MIN=-((s - 1 + pmax - offset) // s),
            F_MAX=(dw - 1 - (pmax - offset - kmax + 1)) // s,
            Q_MIN=(pmax - kmax + 1) // s,
            Q_MAX=(s - 1 + pmax) // s,
            DH=rweight.shape[2],
            DW=dw,
            KMAX=kmax,
            ACC=_acc_dtype(grad),
            BC=bc,
            BW=bw,
            num_warps=warps,
        )
        return
    cbase, cweight = device_table("routing", col_axis, grad.device, kmax, pmax)
    # Its window (DH x DW gradient values) is smaller than the forward's: 4 elements per thread fit when
    # channels are inner (16-byte fp32 vectors at 56 registers); planar gathers keep 2.
    inner = _channels_inner(grad_input)
    bc, _, bw, warps = _tile(c, 1, w, inner, 4 if inner else MAX_BLUR_PER_THREAD)
    _max_blur_backward_kernel[_grid(n, c, h, w, bc, 1, bw)](
        grad,
        codes,
        grad_input,
        rbase,
        rweight,
        cbase,
        cweight,
        c,
        h,
        w,
        grad.shape[2],
        grad.shape[3],
        codes.shape[2],
        codes.shape[3],
        *grad.stride(),
        *codes.stride(),
        *grad_input.stride(),
        pmax,
        DH=rweight.shape[2],
        DW=cweight.shape[2],
        KMAX=kmax,
        ACC=_acc_dtype(grad),
        BC=bc,
        BW=bw,
        num_warps=warps,
    )
