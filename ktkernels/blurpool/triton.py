"""Triton kernels for the blur-pool family and their launchers.

The blur is separable and its windows overlap: output row i reads x rows SH*i + OFFSET_H + e, and output
i + 1 reads SH of them again. The rolling kernels therefore give each program a (BC, 1, BW) tile of channels x
columns and R consecutive output rows: every x row is loaded and filtered along W once, then added with a
scalar row weight into each output row whose window holds it. That costs SH rows of loads and FMAs per output
row instead of DH, which is what the H100 needs: its per-output gathers issued more instructions than it could
issue in the time its memory moved the bytes (benchmarks/NOTES.md, "rolling"). Rows and columns both come as
window tables (``geometry.window_table``: output j reads columns S*j + OFFSET + d), so all index maths of
padding sits in ``geometry.py``; the launcher picks the tile from the memory layout (channels_last: a wide
BC, planar: a wide BW), so the innermost memory axis is the fastest tile axis.

- ``_rolling_blur_kernel`` / ``_rolling_blur_adjoint_kernel``: the blur forward and its adjoint (BlurPool1d is
  the 2-D op with one row). Planar rows (unit W stride, W stride of the op 1, 2 or 4) are loaded as contiguous
  groups of S columns and split into their S phases in registers;
- ``_rolling_max_blur_kernel``: the fused max pool + blur: x rows reduced to row maxima once, max-map rows
  formed from KMAX of them, blurred like the blur's rows; the argmax codes formed where the program owns them.
  A thread owns T consecutive outputs of a row and forms the columns their windows share once;
- ``_rolling_max_blur_backward_kernel``: the max map's gradient formed as in the blur adjoint, routed to the
  window slots that the codes select (planar codes loaded as whole groups, split into phases in registers);
- fallbacks for windows wider than ``MAX_WINDOW`` (pads far from the anchors'): ``_gather_kernel`` ((index,
  weight) tables), ``_max_blur_kernel`` (banded tables, one output row per program) and
  ``_max_blur_backward_kernel`` (routing tables, one input row per program).

Maths is fp32 (fp64 for fp64 inputs) right after every load: bf16 arithmetic is also wrong under the
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import (
    MAX_FILT_SIZE,
    Axis,
    device_table,
    max_pool_output_size,
    window_holes,
    window_table,
    window_zero_taps,
)


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


NUM_WARPS = 4
# Elements per thread of the max-blur kernels: their window of x values, maxes and codes lives in registers,
# and 2 per thread keeps them spill-free at 16 resident warps per SM (python -m ktkernels.bench codegen).
MAX_BLUR_PER_THREAD = 2
# (outputs of a row T, channels, PREFETCH) of the rolling max-blur kernels, by channels_inner. T and channels are
# per forward thread: planar threads share the columns of two outputs' windows, fewer instructions and registers
# than two outputs apart; channels_last threads take two channels of one output (a vector per column). T = 4 cuts
# the issue time by another 15% but needs ~160 registers, 12 warps per SM (benchmarks/NOTES.md, "columns").
# PREFETCH: rows both kernels load ahead of their arithmetic. The H100 ran them at 2.3-3x their issue time, as if
# load latency were exposed ("third H100 run"); 0 is what it measured, `bench blurpool --tune-max-blur` times more.
MAX_BLUR_SHAPE = {False: (2, 1, 0), True: (1, 2, 0)}


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


# Rolling blur kernels: a program owns a [BC, 1, BW] column tile of R consecutive output rows (forward) or of
# P = SH * R consecutive input rows (adjoint) and walks down the plane. Each x row (gradient row) is loaded and
# filtered along W once, then added with a scalar row weight into every output row whose window holds it, so
# a row costs its loads and D FMAs per element once instead of once per overlapping window. Rows and columns
# both come as window tables (geometry.window_table), whose windows start at S*i + OFFSET on every output.
# The instruction count is the limit here, not the bytes: the per-output gathers issued up to ~170 SASS
# instructions per fp32 output, more than an H100 can issue in the time its memory moves the bytes (NOTES,
# "rolling").
#
# The geometry (sizes, strides but the batch's) is compile-time: Triton then proves the alignment of every row
# and the constancy of the border masks over a vector; with runtime sizes every planar load along W compiled
# to scalar loads (benchmarks/NOTES.md, "planar"). A network has a handful of shapes.
@triton.jit
def _output_tile(C, HO, WO, cw_ptr, D: tl.constexpr, BC: tl.constexpr, R: tl.constexpr, BW: tl.constexpr):
    """A rolling forward program's tile: image n, channels c (BC, 1, 1), output columns j (1, 1, BW), their
    column block wb, first output row i0, and the D column weights of the window table at j."""
    n, cb, hb, wb = _tile_blocks(C, HO, WO, BC, R, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    j = wb * BW + tl.arange(0, BW)[None, None, :]
    col_weights = ()
    for d in tl.static_range(D):
        col_weights = col_weights + (tl.load(cw_ptr + d * WO + j, mask=j < WO, other=0.0),)
    return n, c, j, wb, hb * R, col_weights


@triton.jit
def _store_output_row(out_row, ok, lines, rw_ptr, i, HO, FIRST: tl.constexpr, DH: tl.constexpr,
                      HOLES: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Output row i = sum_e rw[e, i] * lines[FIRST + e], stored at ``out_row``. HOLES: the taps e (bit mask) whose
    zero weights must not multiply the line (it may hold inf there)."""
    acc = tl.zeros(ok.shape, ACC)
    for e in tl.static_range(DH):
        rw = tl.load(rw_ptr + e * HO + i, mask=i < HO, other=0.0)
        line = lines[FIRST + e]
        if (HOLES >> e) & 1:
            line = tl.where(rw != 0.0, line, 0.0)
        acc += rw * line
    tl.store(out_row, acc.to(out_row.dtype.element_ty), mask=ok & (i < HO))


@triton.jit
def _load_window_row(
    row,
    row_ok,
    wb,
    SXW: tl.constexpr,
    W: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    PLANAR: tl.constexpr,
    BW: tl.constexpr,
):
    """The loads ``_window_line`` combines for the BW outputs of column block wb, a flat tuple of NL tensors.

    PLANAR rows (unit W stride, S in 1, 2, 4) are loaded as whole S-element groups, BW*S contiguous elements
    per group offset q in [OFFSET // S, (OFFSET + D - 1) // S], to be split into phases in registers. Other rows
    load each tap's column (a vector along C in channels_last), D of them.
    """
    loads = ()
    if PLANAR:
        lane = tl.arange(0, BW * S)[None, None, :]
        for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
            cols = (wb * BW + q) * S + lane
            loads = loads + (tl.load(row + cols, mask=row_ok & (cols >= 0) & (cols < W), other=0.0),)
    else:
        j = wb * BW + tl.arange(0, BW)[None, None, :]
        for d in tl.static_range(D):
            col = S * j + (OFFSET + d)
            loads = loads + (tl.load(row + col * SXW, mask=row_ok & (col >= 0) & (col < W), other=0.0),)
    return loads


@triton.jit
def _window_line(
    loaded,
    FIRST: tl.constexpr,
    col_weights,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    COL_HOLES: tl.constexpr,
    PLANAR: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """sum_d cw[d, j] * row[S*j + OFFSET + d] for the BW outputs j of a column block: shape (BC, 1, BW), from the
    row's ``_load_window_row`` tensors at loaded[FIRST:].

    Planar: column S*j + OFFSET + d is phase (OFFSET + d) % S of group j + (OFFSET + d) // S. COL_HOLES: the taps
    (bit mask, ``geometry.window_holes``) with a zero weight at some in-range position (odd sizes), whose inf
    must not become 0 * inf.
    """
    line = tl.zeros((BC, 1, BW), ACC)
    if PLANAR:
        phases = ()
        for q in tl.static_range((OFFSET + D - 1) // S - OFFSET // S + 1):
            phases = phases + _phases(loaded[FIRST + q].to(ACC), S, BC, 1, BW)
        for d in tl.static_range(D):
            value = phases[OFFSET + d - OFFSET // S * S]
            if (COL_HOLES >> d) & 1:
                value = tl.where(col_weights[d] != 0.0, value, 0.0)
            line += col_weights[d] * value
    else:
        for d in tl.static_range(D):
            value = loaded[FIRST + d].to(ACC)
            if (COL_HOLES >> d) & 1:
                value = tl.where(col_weights[d] != 0.0, value, 0.0)
            line += col_weights[d] * value
    return line


@triton.jit(do_not_specialize=["H", "HO"])
def _rolling_blur_kernel(
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
    SXW: tl.constexpr,
    SOC: tl.constexpr,
    SOH: tl.constexpr,
    SOW: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    SH: tl.constexpr,
    OFFSET_H: tl.constexpr,
    DH: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ROW_HOLES: tl.constexpr,
    COL_HOLES: tl.constexpr,
    PLANAR: tl.constexpr,
    NL: tl.constexpr,
    PREFETCH: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    R: tl.constexpr,
    BW: tl.constexpr,
):
    """out[i, j] = sum_e rw[e, i] sum_d cw[d, j] x[SH*i + OFFSET_H + e, S*j + OFFSET + d] for R rows i per program.

    x row SH*i0 + OFFSET_H + t (t = 0 .. SH*(R-1) + DH - 1) is filtered along W once (``_window_line``); output
    row i0 + r adds lines SH*r .. SH*r + DH - 1 and is stored as soon as its last line is in. Row t's NL loads
    (``_load_window_row``) are issued PREFETCH rows before it is filtered, so that they are in flight together.
    """
    n, c, j, wb, i0, col_weights = _output_tile(C, HO, WO, cw_ptr, D, BC, R, BW)
    c_ok = c < C
    j_ok = j < WO
    plane = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    out_plane = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * SOC + j * SOW
    lines = ()
    loaded = ()  # loaded[t * NL + l]: load l of x row t (placeholders for rows no window holds)
    for t in tl.static_range(-PREFETCH, SH * (R - 1) + DH):
        if t + PREFETCH < SH * (R - 1) + DH:
            if (t + PREFETCH) % SH < DH:  # some output's window holds this row (not so between windows if DH < SH)
                xr = SH * i0 + (OFFSET_H + t + PREFETCH)
                row_ok = c_ok & (xr >= 0) & (xr < H)
                loaded = loaded + _load_window_row(plane + xr * SXH, row_ok, wb, SXW, W, S, OFFSET, D, PLANAR, BW)
            else:
                for _ in tl.static_range(NL):
                    loaded = loaded + (0,)
        if t >= 0:
            if t % SH < DH:
                lines = lines + (
                    _window_line(loaded, t * NL, col_weights, S, OFFSET, D, COL_HOLES, PLANAR, ACC, BC, BW),
                )
            else:
                lines = lines + (tl.zeros((BC, 1, BW), ACC),)
        for r in tl.static_range(R):
            if SH * r + DH - 1 == t:  # output row i0 + r is complete
                _store_output_row(out_plane + (i0 + r) * SOH, c_ok & j_ok, lines, rw_ptr, i0 + r, HO, SH * r, DH,
                                  ROW_HOLES, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["H", "HO"])
def _rolling_blur_adjoint_kernel(
    g_ptr,
    gx_ptr,
    rw_ptr,
    cw_ptr,
    C,
    H,
    HO,
    sgn,
    sxn,
    SGC: tl.constexpr,
    SGH: tl.constexpr,
    SGW: tl.constexpr,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    SXW: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    SH: tl.constexpr,
    OFFSET_H: tl.constexpr,
    DH: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ROW_HOLES: tl.constexpr,
    COL_HOLES: tl.constexpr,
    PLANAR: tl.constexpr,
    PREFETCH: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    P: tl.constexpr,
    BW: tl.constexpr,
):
    """The adjoint of ``_rolling_blur_kernel``: gx[p, S*u + r] = sum_{i, e: SH*i + OFFSET_H + e = p} rw[e, i] *
    sum_q cw[S*q + r - OFFSET, u - q] g[i, u - q], for P = SH * R rows p per program and BW column groups u.

    The program's first row is p0 = SH*m. Gradient row m + k reaches rows SH*k + OFFSET_H + e (e < DH) of the
    program; each is loaded once per column offset q, combined along W into the S phases of gx row p, and
    added into every row it reaches; row t is stored after the last gradient row that reaches it,
    k = (t - OFFSET_H) // SH. Planar rows interleave the phases into one contiguous store. Every gx element
    has one writer: deterministic. Gradient row m + k is loaded PREFETCH rows before it is combined.
    """
    n, cb, hb, ub = _tile_blocks(C, H, tl.cdiv(W, S), BC, P, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    u = ub * BW + tl.arange(0, BW)[None, None, :]
    c_ok = c < C
    m = hb * (P // SH)
    # cws[(q - OFFSET // S) * S + r]: weight of window position S*q + r - OFFSET of output u - q (0 outside)
    cws = ()
    for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
        for r in tl.static_range(S):
            inside = (u - q >= 0) & (u - q < WO) & (S * q + r - OFFSET >= 0) & (S * q + r - OFFSET < D)
            cws = cws + (tl.load(cw_ptr + (S * q + r - OFFSET) * WO + (u - q), mask=inside, other=0.0),)
    g_plane = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * SGC
    gx_plane = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    # parts[(k - K0) * S + r]: gradient row m + k along W, phase r, from K0 = (1 - DH - OFFSET_H) // SH (the
    # first row reaching row 0, or the one row 0 is stored after when DH < SH leaves it unreached).
    parts = ()
    glines = ()  # glines[(k - K0) * NQ + q - OFFSET // S]: gradient row m + k at columns u - q (NQ offsets q)
    for k in tl.static_range((1 - DH - OFFSET_H) // SH - PREFETCH, (P - 1 - OFFSET_H) // SH + 1):
        if k + PREFETCH <= (P - 1 - OFFSET_H) // SH:
            i = m + (k + PREFETCH)
            row_ok = c_ok & (i >= 0) & (i < HO)
            for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
                col = u - q
                ok = row_ok & (col >= 0) & (col < WO)
                glines = glines + (tl.load(g_plane + i * SGH + col * SGW, mask=ok, other=0.0).to(ACC),)
        if k >= (1 - DH - OFFSET_H) // SH:
            for r in tl.static_range(S):
                part = tl.zeros((BC, 1, BW), ACC)
                for q in tl.static_range(OFFSET // S, (OFFSET + D - 1) // S + 1):
                    if S * q + r - OFFSET >= 0:
                        if S * q + r - OFFSET < D:
                            w = cws[(q - OFFSET // S) * S + r]
                            value = glines[
                                (k - (1 - DH - OFFSET_H) // SH) * ((OFFSET + D - 1) // S - OFFSET // S + 1)
                                + q
                                - OFFSET // S
                            ]
                            if (COL_HOLES >> (S * q + r - OFFSET)) & 1:
                                value = tl.where(w != 0.0, value, 0.0)
                            part += w * value
                parts = parts + (part,)
            for t in tl.static_range(SH * k + OFFSET_H, SH * k + OFFSET_H + SH):
                if t >= 0:
                    if t < P:  # gx row m*SH + t is complete: sum its gradient rows m + k2, k2 <= k
                        acc = ()
                        for _ in tl.static_range(S):
                            acc = acc + (tl.zeros((BC, 1, BW), ACC),)
                        for k2 in tl.static_range((1 - DH - OFFSET_H) // SH, k + 1):
                            if t - SH * k2 - OFFSET_H < DH:
                                i2 = m + k2
                                rw = tl.load(rw_ptr + (t - SH * k2 - OFFSET_H) * HO + i2, mask=(i2 >= 0) & (i2 < HO),
                                             other=0.0)  # fmt: skip
                                summed = ()
                                for r in tl.static_range(S):
                                    part = parts[(k2 - (1 - DH - OFFSET_H) // SH) * S + r]
                                    if (ROW_HOLES >> (t - SH * k2 - OFFSET_H)) & 1:
                                        part = tl.where(rw != 0.0, part, 0.0)
                                    summed = summed + (acc[r] + rw * part,)
                                acc = summed
                        p = SH * m + t
                        p_ok = c_ok & (p < H)
                        if PLANAR:
                            cols = ub * BW * S + tl.arange(0, BW * S)[None, None, :]
                            gx = _interleave(acc, S, BC, 1, BW)
                            tl.store(gx_plane + p * SXH + cols, gx.to(gx_ptr.dtype.element_ty), mask=p_ok & (cols < W))
                        else:
                            for r in tl.static_range(S):
                                cols = S * u + r
                                tl.store(gx_plane + p * SXH + cols * SXW, acc[r].to(gx_ptr.dtype.element_ty),
                                         mask=p_ok & (cols < W))  # fmt: skip


@triton.jit
def _scan_step(best, code, v, index, valid, FIRST: tl.constexpr, CHECK_VALID: tl.constexpr):
    """One step of torch.max_pool2d's scan (``_argmax_step``): v at ``index`` replaces best if v > best or v is
    NaN. FIRST: the scan's first element, taken if valid. CHECK_VALID: windows may hold padding (``valid``
    False), which is never taken, and the first valid element is taken whatever its value."""
    if FIRST:
        if CHECK_VALID:
            return tl.where(valid, v, float("-inf")), tl.where(valid, index, -1)
        else:
            return v, index + tl.zeros(v.shape, tl.int32)
    else:
        take = (v > best) | (v != v)
        if CHECK_VALID:
            take = valid & (take | (code < 0))
        return tl.where(take, v, best), tl.where(take, index, code)


@triton.jit
def _map_code(row_max, row_arg, at: tl.constexpr, D: tl.constexpr, KMAX: tl.constexpr, CHECK_VALID: tl.constexpr):
    """The max-map code a * KMAX + b at row_max[at]'s column from the row maxima (and their b) of the KMAX x rows
    from that one: torch's row-major scan, row by row (each row's first maximum / last NaN, then across rows)."""
    best, code = _scan_step(row_max[at], row_arg[at], row_max[at], row_arg[at], row_arg[at] >= 0, True, CHECK_VALID)
    for a in tl.static_range(1, KMAX):
        best, code = _scan_step(best, code, row_max[at + a * D], row_arg[at + a * D] + a * KMAX,
                                row_arg[at + a * D] >= 0, False, CHECK_VALID)  # fmt: skip
    return code


@triton.jit
def _load_x_row(plane, xr, c_ok, col_ok, g, H, SXH: tl.constexpr, SXW: tl.constexpr, S: tl.constexpr,
                T: tl.constexpr, FIRST: tl.constexpr, NE: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """x row xr at the NE columns S*T*g + FIRST + e of a max-blur forward thread, -inf outside (a flat tuple)."""
    row_ok = c_ok & (xr >= 0) & (xr < H)
    values = ()
    for e in tl.static_range(NE):
        col = S * T * g + (FIRST + e)
        values = values + (tl.load(plane + xr * SXH + col * SXW, mask=row_ok & col_ok[e], other=float("-inf")).to(ACC),)
    return values


@triton.jit(do_not_specialize=["H", "HO", "HM"])
def _rolling_max_blur_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    rw_ptr,
    cw_ptr,
    C,
    H,
    HO,
    HM,
    sxn,
    son,
    skn,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    SXW: tl.constexpr,
    SOC: tl.constexpr,
    SOH: tl.constexpr,
    SOW: tl.constexpr,
    SKC: tl.constexpr,
    SKH: tl.constexpr,
    SKW: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    WM: tl.constexpr,
    SH: tl.constexpr,
    OFFSET_H: tl.constexpr,
    DH: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ROW_ZEROS: tl.constexpr,
    COL_ZEROS: tl.constexpr,
    PMAX: tl.constexpr,
    KMAX: tl.constexpr,
    T: tl.constexpr,
    NM: tl.constexpr,
    PREFETCH: tl.constexpr,
    CODES: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    R: tl.constexpr,
    BG: tl.constexpr,
):
    """out = R_h m R_w^T for the stride-1 KMAX x KMAX max map m of x (padding PMAX, out-of-range excluded), R
    output rows per program as in ``_rolling_blur_kernel``, and (CODES) the argmax codes of the max-map positions
    it owns; without CODES (no backward to come) the argmax is neither formed nor stored.

    A thread owns T consecutive outputs j = T*g + t of a row (a column group g): every x column, row maximum and
    max-map value its T windows share is a separate tensor of the (BC, 1, BG) tile, formed once and reused by
    each window that holds it (a tensor per output would form the D/S-fold overlap of the windows again, D/S
    times). Both window tables cover the owned codes (geometry.window_table(cover_owned=True)): the T windows
    span NM = S*(T-1) + D max-map columns S*T*g + OFFSET + mm, which need NM + KMAX - 1 x columns. x row
    SH*i0 + OFFSET_H - PMAX + u is loaded once and reduced to row maxima; max-map row t is the max of KMAX row
    maxima, blurred along W once per output and added into the outputs whose windows hold it. Values take
    NaN-propagating maxima; codes follow torch's row-major scan (first maximum, last NaN) and are formed only
    where the program owns the position, each once grid-wide. PREFETCH: x rows are loaded that many rows ahead
    of the one being reduced, so that their latency overlaps a row's arithmetic (more registers, fewer warps).
    """
    n, cb, hb, gb = _tile_blocks(C, HO, tl.cdiv(WO, T), BC, R, BG)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    g = gb * BG + tl.arange(0, BG)[None, None, :]
    i0 = hb * R
    c_ok = c < C
    cws = ()  # cws[t * D + d]: tap d's weight at output T*g + t
    for t in tl.static_range(T):
        for d in tl.static_range(D):
            cws = cws + (tl.load(cw_ptr + d * WO + T * g + t, mask=T * g + t < WO, other=0.0),)
    plane = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    out_plane = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * SOC
    k_plane = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * SKC
    row_max = ()  # row_max[u * NM + mm]: max over b of x row u at column S*T*g + OFFSET + mm - PMAX + b
    row_arg = ()  # row_arg[u * NM + mm]: its b in torch's scan order (-1: no valid element); used where owned
    lines = ()  # lines[tr * T + t]: max-map row tr blurred along W for output T*g + t
    last_block = gb == tl.cdiv(tl.cdiv(WO, T), BG) - 1  # holds output WO - 1, owner of the columns past S*WO
    col_ok = ()  # col_ok[e]: x column S*T*g + OFFSET - PMAX + e is inside the row
    for e in tl.static_range(NM + KMAX - 1):
        col_ok = col_ok + ((S * T * g + (OFFSET - PMAX + e) >= 0) & (S * T * g + (OFFSET - PMAX + e) < W),)
    loaded = ()  # loaded[u * (NM + KMAX - 1) + e]: x row u of the program at column e of the thread's span
    # Step u loads x row u + PREFETCH (if it exists), then reduces row u: loads run PREFETCH rows ahead.
    for u in tl.static_range(-PREFETCH, SH * (R - 1) + DH + KMAX - 1):
        if u + PREFETCH < SH * (R - 1) + DH + KMAX - 1:
            loaded = loaded + _load_x_row(plane, SH * i0 + (OFFSET_H - PMAX + u + PREFETCH), c_ok, col_ok, g, H, SXH,
                                          SXW, S, T, OFFSET - PMAX, NM + KMAX - 1, ACC)  # fmt: skip
        if u >= 0:
            xr = SH * i0 + (OFFSET_H - PMAX + u)
            row_ok = c_ok & (xr >= 0) & (xr < H)
            for mm in tl.static_range(NM):
                m = loaded[u * (NM + KMAX - 1) + mm]
                best, arg = _scan_step(m, m, m, 0, row_ok & col_ok[mm], True, PMAX > 0)
                for b in tl.static_range(1, KMAX):
                    value = loaded[u * (NM + KMAX - 1) + mm + b]
                    m = tl.maximum(m, value, propagate_nan=tl.PropagateNan.ALL)
                    best, arg = _scan_step(best, arg, value, b, row_ok & col_ok[mm + b], False, PMAX > 0)
                row_max = row_max + (m,)
                row_arg = row_arg + (arg,)
            if u >= KMAX - 1:  # max-map row tr = u - (KMAX - 1) is complete (tr inlined: a local is no constexpr)
                maps = ()
                for mm in tl.static_range(NM):
                    m = row_max[(u - (KMAX - 1)) * NM + mm]
                    for a in tl.static_range(1, KMAX):
                        m = tl.maximum(m, row_max[(u - (KMAX - 1) + a) * NM + mm], propagate_nan=tl.PropagateNan.ALL)
                    maps = maps + (m,)
                for t in tl.static_range(T):
                    line = tl.zeros((BC, 1, BG), ACC)
                    for d in tl.static_range(D):
                        m = maps[S * t + d]
                        if (COL_ZEROS >> d) & 1:  # the map is -inf outside: zero weights select
                            m = tl.where(cws[t * D + d] != 0.0, m, 0.0)
                        line += cws[t * D + d] * m
                    lines = lines + (line,)
                # Output j owns max-map columns S*j + p, p < S; the last output also owns the columns past those
                # (geometry.codes_per_owner): only the last column block forms their codes.
                mr = SH * i0 + (OFFSET_H + u - (KMAX - 1))
                owned = c_ok & (mr >= SH * i0) & ((mr < SH * (i0 + R)) | (i0 + R >= HO)) & (mr < HM)
                k_row = k_plane + mr * SKH
                for t in tl.static_range(T if CODES else 0):
                    for p in tl.static_range(S):
                        code = _map_code(
                            row_max, row_arg, (u - (KMAX - 1)) * NM + S * t + p - OFFSET, NM, KMAX, PMAX > 0
                        )
                        mc = S * (T * g + t) + p
                        tl.store(k_row + mc * SKW, code.to(tl.uint8), mask=owned & (T * g + t < WO) & (mc < WM))
                if CODES and S - OFFSET < D:
                    if last_block:
                        for t in tl.static_range(T):
                            for d in tl.static_range(S - OFFSET, D):
                                code = _map_code(
                                    row_max, row_arg, (u - (KMAX - 1)) * NM + S * t + d, NM, KMAX, PMAX > 0
                                )
                                mc = S * (T * g + t) + OFFSET + d
                                tl.store(k_row + mc * SKW, code.to(tl.uint8),
                                         mask=owned & (T * g + t == WO - 1) & (mc < WM))  # fmt: skip
            for r in tl.static_range(R):
                if SH * r + DH - 1 + KMAX - 1 == u:  # output row i0 + r is complete (lines are -inf off the map)
                    i = i0 + r
                    accs = ()
                    for _ in tl.static_range(T):
                        accs = accs + (tl.zeros((BC, 1, BG), ACC),)
                    for e in tl.static_range(DH):
                        rw = tl.load(rw_ptr + e * HO + i, mask=i < HO, other=0.0)
                        summed = ()
                        for t in tl.static_range(T):
                            line = lines[(SH * r + e) * T + t]
                            if (ROW_ZEROS >> e) & 1:
                                line = tl.where(rw != 0.0, line, 0.0)
                            summed = summed + (accs[t] + rw * line,)
                        accs = summed
                    for t in tl.static_range(T):
                        j = T * g + t
                        tl.store(out_plane + i * SOH + j * SOW, accs[t].to(out_ptr.dtype.element_ty),
                                 mask=c_ok & (i < HO) & (j < WO))  # fmt: skip


@triton.jit
def _load_code_row(k_plane, mr, c_ok, u, ub, HM, SKH: tl.constexpr, SKW: tl.constexpr, WM: tl.constexpr,
                   S: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, PLANAR: tl.constexpr, BC: tl.constexpr,
                   BW: tl.constexpr):  # fmt: skip
    """The codes of max-map row mr at columns S*(u + k) + rho, k in [K0, K1], rho < S, as int32 in that order
    (a flat tuple; 255 outside the map, which no window slot matches). Planar rows load the S codes of every
    group at once and split them into phases in registers."""
    k_row = k_plane + mr * SKH
    codes = ()
    for k in tl.static_range(K0, K1 + 1):
        if PLANAR:
            group_cols = (ub * BW + k) * S + tl.arange(0, BW * S)[None, None, :]
            group_ok = c_ok & (mr >= 0) & (mr < HM) & (group_cols >= 0) & (group_cols < WM)
            group = tl.load(k_row + group_cols, mask=group_ok, other=255).to(tl.int32)
            codes = codes + _phases(group, S, BC, 1, BW)
        else:
            for rho in tl.static_range(S):
                codes = codes + (_load_code(k_row, mr, S * (u + k) + rho, c_ok, HM, SKW, WM),)
    return codes


@triton.jit
def _load_code(k_row, mr, mc, c_ok, HM, SKW: tl.constexpr, WM: tl.constexpr):
    """The code at max-map row mr (row pointer ``k_row``), columns mc, as int32; 255 outside the map."""
    inside = c_ok & (mr >= 0) & (mr < HM) & (mc >= 0) & (mc < WM)
    return tl.load(k_row + mc * SKW, mask=inside, other=255).to(tl.int32)


@triton.jit(do_not_specialize=["H", "HO", "HM"])
def _rolling_max_blur_backward_kernel(
    g_ptr,
    codes_ptr,
    gx_ptr,
    rw_ptr,
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
    SGW: tl.constexpr,
    SKC: tl.constexpr,
    SKH: tl.constexpr,
    SKW: tl.constexpr,
    SXC: tl.constexpr,
    SXH: tl.constexpr,
    SXW: tl.constexpr,
    W: tl.constexpr,
    WO: tl.constexpr,
    WM: tl.constexpr,
    SH: tl.constexpr,
    OFFSET_H: tl.constexpr,
    DH: tl.constexpr,
    S: tl.constexpr,
    OFFSET: tl.constexpr,
    D: tl.constexpr,
    ROW_HOLES: tl.constexpr,
    COL_HOLES: tl.constexpr,
    PMAX: tl.constexpr,
    KMAX: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    JO0: tl.constexpr,
    JO1: tl.constexpr,
    KR0: tl.constexpr,
    PREFETCH: tl.constexpr,
    PLANAR: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    P: tl.constexpr,
    BW: tl.constexpr,
):
    """The max-blur backward: gx[p, q] = sum_{a, b} [code(p - a + PMAX, q - b + PMAX) == a*KMAX + b] *
    gm(p - a + PMAX, q - b + PMAX), with gm = R_h^T g R_w the max map's gradient, for P = SH * R rows p and
    BW column groups u (x columns S*u + r) per program.

    gm is formed as in ``_rolling_blur_adjoint_kernel``, each gradient row loaded and combined along W once,
    at the max-map columns S*(u + k) + rho that hold the program's windows (k in [K0, K1], every phase rho: NC
    = (K1 - K0 + 1) * S columns per group), and kept per max-map row tau (row SH*m + tau, tau from T0 =
    PMAX - KMAX + 1) with its codes; x row tau - PMAX is formed once max-map row tau, the last of its windows,
    is in. Max-map column S*v + rho takes taps d with (rho - OFFSET - d) % S == 0 from output
    v + (rho - OFFSET - d) // S, so gradient columns u + jo, jo in [JO0, JO1]; gradient rows m + kr, kr from
    KR0, reach the program's max-map rows (``_rolling_max_blur_backward``). Every gx element has one writer.
    PREFETCH: gradient and code rows are loaded that many steps ahead of the arithmetic that uses them.
    """
    n, cb, hb, ub = _tile_blocks(C, H, tl.cdiv(W, S), BC, P, BW)
    c = cb * BC + tl.arange(0, BC)[:, None, None]
    u = ub * BW + tl.arange(0, BW)[None, None, :]
    c_ok = c < C
    m = hb * (P // SH)
    cws = ()  # cws[(jo - JO0) * D + d]: tap d's weight at output u + jo (unused ones are dead code, never loaded)
    for jo in tl.static_range(JO0, JO1 + 1):
        for d in tl.static_range(D):
            cws = cws + (tl.load(cw_ptr + d * WO + u + jo, mask=(u + jo >= 0) & (u + jo < WO), other=0.0),)
    g_plane = g_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * SGC
    k_plane = codes_ptr + n.to(tl.int64) * skn + c.to(tl.int64) * SKC
    gx_plane = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * SXC
    hgs = ()  # hgs[(kr - KR0) * NC + (k - K0) * S + rho]: gradient row m + kr along W at max-map column S*(u+k)+rho
    gms = ()  # gms[(tau - T0) * NC + (k - K0) * S + rho]: the max map's gradient there
    kcs = ()  # kcs[...]: its codes (255 outside the map: no window slot matches)
    glines = ()  # glines[(kr - KR0) * (JO1 - JO0 + 1) + jo - JO0]: gradient row m + kr at columns u + jo
    # Step kr loads gradient row m + kr + PREFETCH (with PREFETCH, also the codes of the max-map rows that row
    # completes), then combines row m + kr: loads run PREFETCH rows ahead of the arithmetic that uses them.
    for kr in tl.static_range(KR0 - PREFETCH, (P - 1 + PMAX - OFFSET_H) // SH + 1):
        if kr + PREFETCH <= (P - 1 + PMAX - OFFSET_H) // SH:
            i = m + (kr + PREFETCH)
            row_ok = c_ok & (i >= 0) & (i < HO)
            for jo in tl.static_range(JO0, JO1 + 1):
                col = u + jo
                ok = row_ok & (col >= 0) & (col < WO)
                glines = glines + (tl.load(g_plane + i * SGH + col * SGW, mask=ok, other=0.0).to(ACC),)
            if PREFETCH > 0:
                for tau in tl.static_range(SH * (kr + PREFETCH) + OFFSET_H, SH * (kr + PREFETCH) + OFFSET_H + SH):
                    if tau >= PMAX - KMAX + 1:
                        if tau <= P - 1 + PMAX:
                            kcs = kcs + _load_code_row(k_plane, SH * m + tau, c_ok, u, ub, HM, SKH, SKW, WM, S, K0, K1,
                                                       PLANAR, BC, BW)  # fmt: skip
        if kr >= KR0:
            for k in tl.static_range(K0, K1 + 1):
                for rho in tl.static_range(S):
                    hg = tl.zeros((BC, 1, BW), ACC)
                    for d in tl.static_range(D):
                        if (rho - OFFSET - d) % S == 0:
                            w = cws[(k + (rho - OFFSET - d) // S - JO0) * D + d]
                            value = glines[(kr - KR0) * (JO1 - JO0 + 1) + k + (rho - OFFSET - d) // S - JO0]
                            if (COL_HOLES >> d) & 1:
                                value = tl.where(w != 0.0, value, 0.0)
                            hg += w * value
                    hgs = hgs + (hg,)
            for tau in tl.static_range(SH * kr + OFFSET_H, SH * kr + OFFSET_H + SH):
                if tau >= PMAX - KMAX + 1:
                    if tau <= P - 1 + PMAX:  # max-map row SH*m + tau is complete
                        mr = SH * m + tau
                        k_row = k_plane + mr * SKH
                        for k in tl.static_range(K0, K1 + 1):
                            if PREFETCH == 0:  # group k's codes next to their use (planar: the group at once)
                                if PLANAR:
                                    kcs = kcs + _load_code_row(k_plane, mr, c_ok, u, ub, HM, SKH, SKW, WM, S, k, k,
                                                               PLANAR, BC, BW)  # fmt: skip
                            for rho in tl.static_range(S):
                                gm = tl.zeros((BC, 1, BW), ACC)
                                for kr2 in tl.static_range(KR0, kr + 1):
                                    if tau - SH * kr2 - OFFSET_H < DH:
                                        rw = tl.load(rw_ptr + (tau - SH * kr2 - OFFSET_H) * HO + m + kr2,
                                                     mask=(m + kr2 >= 0) & (m + kr2 < HO), other=0.0)  # fmt: skip
                                        hg = hgs[(kr2 - KR0) * (K1 - K0 + 1) * S + (k - K0) * S + rho]
                                        if (ROW_HOLES >> (tau - SH * kr2 - OFFSET_H)) & 1:
                                            hg = tl.where(rw != 0.0, hg, 0.0)
                                        gm += rw * hg
                                gms = gms + (gm,)
                                if PREFETCH == 0:
                                    if not PLANAR:
                                        code = _load_code(k_row, mr, S * (u + k) + rho, c_ok, HM, SKW, WM)
                                        kcs = kcs + (code,)
                        if tau - PMAX >= 0:  # x row SH*m + tau - PMAX has all its windows
                            if tau - PMAX < P:
                                parts = ()
                                for r in tl.static_range(S):
                                    acc = tl.zeros((BC, 1, BW), ACC)
                                    for a in tl.static_range(KMAX):
                                        for b in tl.static_range(KMAX):
                                            # max-map row tau - a, column S*u + r + PMAX - b: slot (a, b) of its window
                                            code = kcs[
                                                (tau - a - (PMAX - KMAX + 1)) * (K1 - K0 + 1) * S
                                                + ((r + PMAX - b) // S - K0) * S
                                                + (r + PMAX - b) % S
                                            ]
                                            gm = gms[
                                                (tau - a - (PMAX - KMAX + 1)) * (K1 - K0 + 1) * S
                                                + ((r + PMAX - b) // S - K0) * S
                                                + (r + PMAX - b) % S
                                            ]
                                            acc += tl.where(code == a * KMAX + b, gm, 0.0)
                                    parts = parts + (acc,)
                                p = SH * m + (tau - PMAX)
                                p_ok = c_ok & (p < H)
                                if PLANAR:
                                    cols = ub * BW * S + tl.arange(0, BW * S)[None, None, :]
                                    gx = _interleave(parts, S, BC, 1, BW)
                                    tl.store(
                                        gx_plane + p * SXH + cols,
                                        gx.to(gx_ptr.dtype.element_ty),
                                        mask=p_ok & (cols < W),
                                    )
                                else:
                                    for r in tl.static_range(S):
                                        cols = S * u + r
                                        tl.store(gx_plane + p * SXH + cols * SXW, parts[r].to(gx_ptr.dtype.element_ty),
                                                 mask=p_ok & (cols < W))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Fallbacks for windows wider than MAX_WINDOW (reflect pads far from the anchors'): the banded max-blur
# forward and the routing backward, one output (input) row per program.


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
    CODES: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
):
    """out[i, j] = sum_e sum_d rband[i, e] cband[j, d] m[rbase[i] + e, cbase[j] + d], and (CODES) the codes it owns.

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
            for d in tl.static_range(DW if CODES else 0):
                q = cbase + d
                tl.store(k_base + r * skh + q * skw, codes[d].to(tl.uint8), mask=owned & _owns(q, j, STRIDE_W, WO, WM))
            rw = tl.load(rband_ptr + i * DH + (rho - (KMAX - 1)))
            acc += rw * tl.where(rw != 0.0, line, 0.0)
    out = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + i * soh + j * sow
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


def _channels_inner(t: torch.Tensor) -> bool:
    return t.size(1) > 1 and t.stride(1) == 1


def _acc_dtype(t: torch.Tensor):
    """fp64 stays fp64 (gradcheck); everything else accumulates in fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _grid(n: int, c: int, h: int, w: int, bc: int, bh: int, bw: int) -> tuple[int]:
    return (n * triton.cdiv(c, bc) * triton.cdiv(h, bh) * triton.cdiv(w, bw),)


# Column strides the planar phase split takes (a power of two); windows wider than this (only pads far from the
# anchors' make them) go to the gather kernel.
PLANAR_STRIDES = (1, 2, 4)
MAX_WINDOW = 2 * MAX_FILT_SIZE
# Output rows per program of the rolling kernels: a program loads SH*(R-1) + DH rows for R outputs, so the
# window overlap costs (DH - SH) / R extra rows per output; 8 keeps that small with enough programs to spread.
ROWS_PER_PROGRAM = 8
# x (gradient) rows the rolling blur kernels load ahead of the arithmetic that uses them, by channels_inner. The
# H100 times fit waves x rows per program x ~0.8 us, as if each program waited out every row's load latency in
# turn (benchmarks/NOTES.md, "third H100 run"); 0 is what it measured, `bench blurpool --tune-blur` times more.
BLUR_PREFETCH = {False: 0, True: 0}


def _planar(x: torch.Tensor, out: torch.Tensor, axes: tuple[Axis, Axis]) -> bool:
    """Whether rows are planar for the phase split: unit W strides on both sides, a power-of-two W stride."""
    return not _channels_inner(x) and x.stride(3) == 1 and out.stride(3) == 1 and axes[1].stride in PLANAR_STRIDES


def _windows_fit(axes: tuple[Axis, Axis], cover_owned: bool = False) -> bool:
    """Whether both axes' windows (``geometry.window_table``) are narrow enough for the rolling kernels."""
    return all(window_table(axis, cover_owned)[1].shape[0] <= MAX_WINDOW for axis in axes)


def blur(x: torch.Tensor, axes: tuple[Axis, Axis], adjoint: bool, out: torch.Tensor) -> None:
    """``out = R_h x R_w^T`` (forward) or ``R_h^T x R_w`` (``adjoint``) per (n, c) plane, for 4-D x and out.

    ``axes`` are the (row, column) axes of the forward op. Every layout takes the rolling kernels; planar rows
    (unit W stride, W stride 1, 2 or 4) load whole groups there. Only windows wider than ``MAX_WINDOW`` take
    the gather kernel.
    """
    if out.numel() == 0:
        return
    if not _windows_fit(axes):
        table = "adjoint" if adjoint else "forward"
        blur_gather(x, *(_table(table, axis, x.device) for axis in axes), out)
    elif adjoint:
        _rolling_adjoint(x, axes, out)
    else:
        _rolling_forward(x, axes, out)


def _rows_per_program(rows: int, most: int = ROWS_PER_PROGRAM) -> int:
    """At most ``most`` rows per program, balanced so the last block is nearly full (28 -> 7)."""
    return triton.cdiv(rows, triton.cdiv(rows, most))


def _rolling_constexprs(src: torch.Tensor, dst: torch.Tensor, axes: tuple[Axis, Axis], adjoint: bool) -> dict:
    """Launch options both rolling kernels share: window geometry, hole flags, planar flag and tile.

    The tile is (BC, 1, BW) over channels and output columns (forward) or column groups (adjoint), one 16-byte
    vector per thread along C (channels_last) or along W (planar: each thread loads one vector of a row).
    """
    row_axis, col_axis = axes
    (offset_h, rows), (offset, cols) = window_table(row_axis), window_table(col_axis)
    planar = _planar(src, dst, axes)
    x = dst if adjoint else src
    n, c, h, w = x.shape
    columns = triton.cdiv(w, col_axis.stride) if adjoint else col_axis.out_size
    vector = max(1, 16 // x.element_size())
    per_thread = max(1, vector // col_axis.stride) if planar else vector
    bc, _, bw, warps = _tile(c, 1, columns, _channels_inner(x), per_thread)
    return dict(W=w, WO=col_axis.out_size, SH=row_axis.stride, OFFSET_H=offset_h, DH=rows.shape[0],
                S=col_axis.stride, OFFSET=offset, D=cols.shape[0], ROW_HOLES=window_holes(row_axis),
                COL_HOLES=window_holes(col_axis), PLANAR=planar, PREFETCH=BLUR_PREFETCH[_channels_inner(x)],
                ACC=_acc_dtype(x), BC=bc, BW=bw, num_warps=warps)  # fmt: skip


def _rolling_forward(x: torch.Tensor, axes: tuple[Axis, Axis], out: torch.Tensor) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    rows = _rows_per_program(ho)
    options = _rolling_constexprs(x, out, axes, adjoint=False)
    # _load_window_row's tensors per x row: planar, one per group offset q; otherwise one per tap
    groups = (options["OFFSET"] + options["D"] - 1) // options["S"] - options["OFFSET"] // options["S"] + 1
    loads_per_row = groups if options["PLANAR"] else options["D"]
    _rolling_blur_kernel[_grid(n, c, ho, wo, options["BC"], rows, options["BW"])](
        x,
        out,
        _table("window", axes[0], x.device)[1],
        _table("window", axes[1], x.device)[1],
        c,
        h,
        ho,
        x.stride(0),
        out.stride(0),
        *x.stride()[1:],
        *out.stride()[1:],
        R=rows,
        NL=loads_per_row,
        **options,
    )


def _rolling_adjoint(grad: torch.Tensor, axes: tuple[Axis, Axis], gx: torch.Tensor) -> None:
    n, c, h, w = gx.shape
    ho = grad.shape[2]
    rows = axes[0].stride * _rows_per_program(triton.cdiv(h, axes[0].stride))
    options = _rolling_constexprs(grad, gx, axes, adjoint=True)
    _rolling_blur_adjoint_kernel[_grid(n, c, h, triton.cdiv(w, axes[1].stride), options["BC"], rows, options["BW"])](
        grad,
        gx,
        _table("window", axes[0], grad.device)[1],
        _table("window", axes[1], grad.device)[1],
        c,
        h,
        ho,
        grad.stride(0),
        gx.stride(0),
        *grad.stride()[1:],
        *gx.stride()[1:],
        P=rows,
        **options,
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


def _codes_args(x: torch.Tensor, kmax: int, pmax: int, out: torch.Tensor, codes: torch.Tensor | None) -> tuple:
    """(pointer, (HM, WM), strides) of the codes, or of nothing when there are none (``out`` as a pointer that no
    store reaches, the max-map sizes, zero strides)."""
    if codes is not None:
        return codes, tuple(codes.shape[2:]), codes.stride()
    return out, tuple(max_pool_output_size(size, kmax, pmax) for size in x.shape[2:]), (0, 0, 0, 0)


def max_blur_forward(
    x: torch.Tensor, kmax: int, pmax: int, axes: tuple[Axis, Axis], out: torch.Tensor, codes: torch.Tensor | None
) -> None:
    """``out = R_rows maxmap(x) R_cols^T`` and the argmax ``codes`` of every max-map position (None: a forward with
    no backward to come, which neither forms nor stores them).

    ``axes`` are the blur's (row, column) axes over the max map. Every layout takes the rolling kernel; windows
    wider than ``MAX_WINDOW`` take the banded one (geometry.banded_table).
    """
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    if out.numel() == 0:
        return
    row_axis, col_axis = axes
    if _windows_fit(axes, cover_owned=True):
        _rolling_max_blur(x, kmax, pmax, axes, out, codes)
        return
    rbase, rband = _table("banded", row_axis, x.device)
    bc, _, bw, warps = _tile(c, 1, wo, _channels_inner(x), MAX_BLUR_PER_THREAD)
    grid = _grid(n, c, ho, wo, bc, 1, bw)
    cbase, cband = _table("banded", col_axis, x.device)
    codes_ptr, (hm, wm), codes_strides = _codes_args(x, kmax, pmax, out, codes)
    _max_blur_kernel[grid](
        x,
        out,
        codes_ptr,
        rbase,
        rband,
        cbase,
        cband,
        c,
        h,
        w,
        ho,
        wo,
        hm,
        wm,
        *x.stride(),
        *out.stride(),
        *codes_strides,
        row_axis.stride,
        col_axis.stride,
        pmax,
        DH=rband.shape[1],
        DW=cband.shape[1],
        KMAX=kmax,
        CODES=codes is not None,
        ACC=_acc_dtype(x),
        BC=bc,
        BW=bw,
        num_warps=warps,
    )


def _rolling_max_blur(x: torch.Tensor, kmax: int, pmax: int, axes: tuple[Axis, Axis], out, codes) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2:]
    row_axis, col_axis = axes
    (offset_h, rows), (offset, cols) = (_table("window", axis, x.device, True) for axis in axes)
    t, per_thread, prefetch = MAX_BLUR_SHAPE[_channels_inner(x)]
    bc, _, bg, warps = _tile(c, 1, triton.cdiv(wo, t), _channels_inner(x), per_thread)
    # 3 x 3 pools (DenseNet) keep three x rows of the window live: with 7-8 rows per program, triton 3.8's ptxas
    # spills a register in a small bf16 channels_last case (test_codegen), though the stem would issue 17% less.
    r = _rows_per_program(ho, ROWS_PER_PROGRAM if kmax <= 2 else ROWS_PER_PROGRAM // 2)
    codes_ptr, (hm, wm), codes_strides = _codes_args(x, kmax, pmax, out, codes)
    _rolling_max_blur_kernel[_grid(n, c, ho, triton.cdiv(wo, t), bc, r, bg)](
        x,
        out,
        codes_ptr,
        rows,
        cols,
        c,
        h,
        ho,
        hm,
        x.stride(0),
        out.stride(0),
        codes_strides[0],
        *x.stride()[1:],
        *out.stride()[1:],
        *codes_strides[1:],
        W=w,
        WO=wo,
        WM=wm,
        SH=row_axis.stride,
        OFFSET_H=offset_h,
        DH=rows.shape[0],
        S=col_axis.stride,
        OFFSET=offset,
        D=cols.shape[0],
        ROW_ZEROS=window_zero_taps(row_axis, True),
        COL_ZEROS=window_zero_taps(col_axis, True),
        PMAX=pmax,
        KMAX=kmax,
        T=t,
        NM=col_axis.stride * (t - 1) + cols.shape[0],  # max-map columns of a thread's T windows
        PREFETCH=prefetch,
        CODES=codes is not None,
        ACC=_acc_dtype(x),
        BC=bc,
        R=r,
        BG=bg,
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
    """Gradient of max-blur w.r.t. its input. Every layout takes the rolling kernel; windows wider than
    ``MAX_WINDOW`` take routing tables (geometry.routing_table)."""
    n, c, h, w = grad_input.shape
    if grad_input.numel() == 0:
        return
    row_axis, col_axis = axes
    if _windows_fit(axes):
        _rolling_max_blur_backward(grad, codes, kmax, pmax, axes, grad_input)
        return
    rbase, rweight = _table("routing", row_axis, grad.device, kmax, pmax)
    cbase, cweight = _table("routing", col_axis, grad.device, kmax, pmax)
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


def _rolling_max_blur_backward(grad: torch.Tensor, codes: torch.Tensor, kmax: int, pmax: int, axes, gx) -> None:
    n, c, h, w = gx.shape
    row_axis, col_axis = axes
    (offset_h, rows), (offset, cols) = (_table("window", axis, grad.device) for axis in axes)
    s, d = col_axis.stride, cols.shape[0]
    planar = _planar(grad, gx, axes)
    groups = triton.cdiv(w, s)
    bc, _, bw, warps = _tile(c, 1, groups, _channels_inner(gx), MAX_BLUR_PER_THREAD)
    p = row_axis.stride * _rows_per_program(triton.cdiv(h, row_axis.stride))
    k0, k1 = (pmax - kmax + 1) // s, (s - 1 + pmax) // s  # groups u + k holding the windows of group u
    _rolling_max_blur_backward_kernel[_grid(n, c, h, groups, bc, p, bw)](
        grad,
        codes,
        gx,
        rows,
        cols,
        c,
        h,
        grad.shape[2],
        codes.shape[2],
        grad.stride(0),
        codes.stride(0),
        gx.stride(0),
        *grad.stride()[1:],
        *codes.stride()[1:],
        *gx.stride()[1:],
        W=w,
        WO=grad.shape[3],
        WM=codes.shape[3],
        SH=row_axis.stride,
        OFFSET_H=offset_h,
        DH=rows.shape[0],
        S=s,
        OFFSET=offset,
        D=d,
        ROW_HOLES=window_holes(row_axis),
        COL_HOLES=window_holes(col_axis),
        PMAX=pmax,
        KMAX=kmax,
        K0=k0,
        K1=k1,
        # gradient columns u + jo reaching max-map columns S*(u + k) + rho, k in [K0, K1]
        JO0=k0 + (1 - offset - d) // s,
        JO1=k1 + (s - 1 - offset) // s,
        # the first gradient row reaching max-map row PMAX - KMAX + 1 of a program (relative to SH*m)
        KR0=(pmax - kmax + 2 - rows.shape[0] - offset_h) // row_axis.stride,
        PLANAR=planar,
        PREFETCH=MAX_BLUR_SHAPE[_channels_inner(gx)][2],
        ACC=_acc_dtype(grad),
        BC=bc,
        P=p,
        BW=bw,
        num_warps=warps,
    )


def _table(kind: str, axis: Axis, device: torch.device, *args: int) -> tuple:
    """``geometry.device_table``, refused when the kernels' int32 offsets into a table would wrap (an axis of
    some 10^8 positions): the rolling kernels read ``weight[e * OUT + i]``, the others ``index[p * WIDTH + k]``."""
    from .geometry import INT32_MAX  # here, not at the top: a line added there moves every kernel's cache key

    table = device_table(kind, axis, device, *args)
    for part in table:
        if isinstance(part, torch.Tensor) and part.numel() > INT32_MAX:
            raise ValueError(
                f"blur pool along an axis of {axis.size} positions: its {kind} table holds {part.numel()} "
                "elements, more than the Triton kernels' 32-bit offsets reach (2^31); use backend 'cuda' or 'torch'"
            )
    return table
