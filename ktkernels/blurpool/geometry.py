"""The geometry of blur pooling: filter taps, padding, output sizes and the 1-D gather tables.

Every backend computes the same separable operator. Along one axis of length ``L`` a blur pool with
filter size ``k``, stride ``s``, pads ``(before, after)`` and a pad mode is a sparse ``L_out x L``
matrix ``R``::

    R[i, p] = sum over taps u with  fold(s*i + u - before) == p  of  a_u / sum(a)

where ``a`` is row ``k`` of Pascal's triangle and ``fold`` maps a padded position back into
``[0, L)`` (reflect, replicate) or drops it (zero). The 2-D op is ``Y = R_h X R_w^T`` and its
gradient is ``dX = R_h^T dY R_w``.

Kernels never see pads or modes. They receive each axis as a dense table of (index, weight)
pairs: ``R`` row by row for the forward, ``R^T`` row by row for the backward. So the forward and
the backward are one gather kernel, and the index maths of padding lives here and nowhere else.
The fused max-blur of the Triton backend takes ``R`` as bands instead (``banded_table``): per output a
base index and the weights of a contiguous window, so neighbouring taps share their loads.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

PAD_MODES = ("reflect", "replicate", "zero")
PAD_MODE_ALIASES = {
    "reflect": "reflect",
    "refl": "reflect",
    "replicate": "replicate",
    "repl": "replicate",
    "zero": "zero",
    "zeros": "zero",
    "constant": "zero",
}
MAX_FILT_SIZE = 7
MAX_STRIDE = 4


def canonical_pad_mode(mode: str) -> str:
    """Map the anchors' spellings ('refl', 'repl', 'constant', ...) to reflect | replicate | zero."""
    if not isinstance(mode, str) or mode.lower() not in PAD_MODE_ALIASES:
        raise ValueError(f"unknown pad mode {mode!r}; expected one of {sorted(PAD_MODE_ALIASES)}")
    return PAD_MODE_ALIASES[mode.lower()]


def binomial_taps(filt_size: int) -> list[float]:
    """Row ``filt_size`` of Pascal's triangle, normalised to sum 1 (exact dyadic rationals)."""
    total = 2 ** (filt_size - 1)
    return [math.comb(filt_size - 1, i) / total for i in range(filt_size)]


def binomial_filter2d(filt_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (k, k) filter ``a a^T / 4^(k-1)`` that every anchor uses."""
    a = torch.tensor(binomial_taps(filt_size), dtype=torch.float64)
    return torch.outer(a, a).to(dtype)


def adobe_pads(filt_size: int, pad_off: int = 0) -> tuple[int, int]:
    """antialiased-cnns / kornia>=0.9: ``((k-1)//2 + pad_off, ceil((k-1)/2) + pad_off)``."""
    return (filt_size - 1) // 2 + pad_off, filt_size // 2 + pad_off


FLAVOURS = ("adobe", "kornia09", "kornia_legacy", "timm", "composer", "ffcv")


def flavour_pads(flavour: str, filt_size: int, stride: int = 2, pad_off: int = 0) -> tuple[int, int]:
    """(before, after) padding of one axis, per anchor (reference/blurpool_anchors.md section 2.3).

    - ``adobe`` (antialiased-cnns) and ``kornia09``: ``((k-1)//2 + pad_off, k//2 + pad_off)`` -> ceil(L/s);
    - ``kornia_legacy`` (kornia <= 0.8): ``((k-1)//2, (k-1)//2)`` -> one short for even k and odd L;
    - ``timm``: ``p = ((s-1) + (k-1))//2`` on both sides (even k shifts the grid by one pixel);
    - ``composer`` / ``ffcv``: the 3x3 filter with pad 1 on both sides.

    >>> [flavour_pads(f, 4) for f in FLAVOURS[:4]]
    [(1, 2), (1, 2), (1, 1), (2, 2)]
    """
    if flavour in ("adobe", "kornia09"):
        return adobe_pads(filt_size, pad_off if flavour == "adobe" else 0)
    if flavour == "kornia_legacy":
        return (filt_size - 1) // 2, (filt_size - 1) // 2
    if flavour == "timm":
        p = ((stride - 1) + (filt_size - 1)) // 2
        return p, p
    if flavour in ("composer", "ffcv"):
        return filt_size // 2, filt_size // 2
    raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")


def output_size(size: int, filt_size: int, stride: int, pad_before: int, pad_after: int) -> int:
    """``floor((L + before + after - k) / s) + 1``; works on SymInts too."""
    return (size + pad_before + pad_after - filt_size) // stride + 1


def max_pool_output_size(size: int, kmax: int, pmax: int) -> int:
    """Size of the stride-1 max map that MaxBlurPool blurs: ``L + 2*pmax - kmax + 1``."""
    return size + 2 * pmax - kmax + 1


INT32_MAX = 2**31 - 1


class Axis(NamedTuple):
    """One spatial axis of a blur pool (a NamedTuple: hashed in C, it keys the per-call caches)."""

    size: int
    filt_size: int
    stride: int
    pad_before: int
    pad_after: int
    mode: str

    @property
    def out_size(self) -> int:
        return output_size(self.size, self.filt_size, self.stride, self.pad_before, self.pad_after)


def _fold(pos: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Map padded positions into ``[0, size)``; returns (index, valid). Pads are < size for reflect."""
    if mode == "reflect":
        pos = np.abs(pos)
        pos = np.where(pos >= size, 2 * (size - 1) - pos, pos)
        return pos, np.ones(pos.shape, dtype=bool)
    if mode == "replicate":
        return np.clip(pos, 0, size - 1), np.ones(pos.shape, dtype=bool)
    valid = (pos >= 0) & (pos < size)
    return np.where(valid, pos, 0), valid


@functools.lru_cache(maxsize=512)
def forward_table(axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``R``: index and weight arrays of shape (out_size, filt_size).

    Taps that fall in zero padding get weight 0 and index 0, so kernels never need a mask. Every table derives
    from this one, and their indices are int32: an axis past 2^31 - 1 positions (or outputs) is refused here.
    """
    if max(axis.size, axis.out_size) > INT32_MAX:
        raise ValueError(
            f"blur pool along an axis of {axis.size} positions ({axis.out_size} outputs): the kernels' int32 index "
            f"tables hold at most {INT32_MAX}; use backend 'torch'"
        )
    i = np.arange(axis.out_size, dtype=np.int64)[:, None]
    u = np.arange(axis.filt_size, dtype=np.int64)[None, :]
    idx, valid = _fold(axis.stride * i + u - axis.pad_before, axis.size, axis.mode)
    taps = np.asarray(binomial_taps(axis.filt_size), dtype=np.float32)
    weight = np.where(valid, taps[None, :], np.float32(0.0)).astype(np.float32)
    return np.ascontiguousarray(idx, dtype=np.int32), np.ascontiguousarray(weight)


@functools.lru_cache(maxsize=512)
def adjoint_table(axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``R^T``: for each input position, the outputs it feeds and the summed weights.

    Shape (size, M) with M the largest number of distinct outputs any input feeds; unused slots
    have weight 0 and index 0. Duplicate (input, output) pairs, which reflection creates at the
    borders, are merged so the gather adds each output once.
    """
    f_idx, f_w = forward_table(axis)
    out_i = np.broadcast_to(np.arange(axis.out_size)[:, None], f_idx.shape).ravel()
    in_p = f_idx.ravel().astype(np.int64)
    w = f_w.ravel().astype(np.float64)
    keep = w != 0
    out_i, in_p, w = out_i[keep], in_p[keep], w[keep]
    pair = in_p * max(axis.out_size, 1) + out_i
    uniq, inverse = np.unique(pair, return_inverse=True)
    summed = np.zeros(uniq.shape, dtype=np.float64)
    np.add.at(summed, inverse, w)
    p, i = uniq // max(axis.out_size, 1), uniq % max(axis.out_size, 1)
    counts = np.bincount(p, minlength=axis.size)
    width = max(int(counts.max(initial=0)), 1)
    slot = np.arange(len(uniq)) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.zeros((axis.size, width), dtype=np.int32)
    weight = np.zeros((axis.size, width), dtype=np.float32)
    idx[p, slot] = i
    weight[p, slot] = summed  # sums of dyadic taps: exact in fp32
    return idx, weight


@functools.lru_cache(maxsize=512)
def banded_table(axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``R`` as bands: ``base`` (out_size,) and ``band`` (out_size, D), ``R[i, base[i] + d] = band[i, d]``.

    Taps that fold onto one position (reflect, replicate) are summed, so a band is contiguous and every
    position in it is read once. The band of output ``i`` also covers the positions whose max-pool codes
    it writes (``codes_per_owner``), so a fused max-blur finds each code it owns inside its window.
    D is the widest band over all outputs; narrower bands are padded with zero weights.
    """
    idx, weight = forward_table(axis)
    n_out, stride = axis.out_size, axis.stride
    owned = codes_per_owner(axis.size, n_out, stride)
    spans = []
    for i in range(n_out):
        first, stop = stride * i, min(stride * i + (stride if i < n_out - 1 else owned), axis.size)
        positions = [*idx[i][weight[i] != 0].tolist(), *range(first, stop)]
        spans.append((min(positions, default=first), max(positions, default=first)))
    base = np.asarray([low for low, _ in spans], dtype=np.int32)
    band = np.zeros((n_out, max((high - low + 1 for low, high in spans), default=1)), dtype=np.float32)
    for i in range(n_out):
        taps = weight[i] != 0
        np.add.at(band[i], idx[i][taps].astype(np.int64) - base[i], weight[i][taps])
    return base, band  # sums of dyadic taps: exact in fp32


@functools.lru_cache(maxsize=512)
def window_table(axis: Axis, cover_owned: bool = False) -> tuple[int, np.ndarray]:
    """Rows of ``R`` as windows on the stride grid: ``offset`` and ``weight`` (D, out_size) with
    ``R[i, s*i + offset + d] = weight[d, i]``.

    Unlike ``banded_table`` the window starts at ``s*i + offset`` for every output, borders included, so
    neighbouring outputs read neighbouring memory and a kernel can load them as vectors; the weights are
    stored tap-major for the same reason. Taps that fold (reflect, replicate) are summed into the window,
    which is widened just enough to hold them; window positions outside ``[0, size)`` or hit by no tap have
    weight 0. ``cover_owned`` widens it further to the positions whose max-pool codes each output owns
    (``codes_per_owner``), for the fused max-blur.

    >>> offset, weight = window_table(Axis(7, 4, 2, 1, 2, "reflect"))
    >>> offset, weight.shape  # the last output's x[8] reflects to x[4]: one position wider than the filter
    (-2, (5, 4))
    """
    idx, weight = forward_table(axis)
    outputs = np.broadcast_to(np.arange(axis.out_size)[:, None], idx.shape)
    live = weight != 0
    rel = idx.astype(np.int64) - axis.stride * outputs
    span = rel[live].tolist()
    if cover_owned:  # output i owns s*i + [0, owned) at most (the last one may own more than s)
        span += [0, codes_per_owner(axis.size, axis.out_size, axis.stride) - 1]
    offset = min(span, default=0)
    width = max(span, default=0) - offset + 1
    window = np.zeros((width, axis.out_size), dtype=np.float32)
    np.add.at(window, (rel[live] - offset, outputs[live]), weight[live])
    return offset, window  # sums of dyadic taps: exact in fp32


@functools.lru_cache(maxsize=512)
def window_holes(axis: Axis) -> int:
    """The taps of ``window_table(axis)`` with a zero weight at a position inside ``[0, size)`` for some output,
    as a bit mask (bit d: tap d). Odd sizes widen the window past some outputs' taps. A kernel that multiplies
    loaded values by the window's weights must select, not multiply, at those taps, or an inf there would give
    0 * inf = NaN where the reference never reads it; the other taps multiply straight away.

    >>> window_holes(Axis(56, 4, 2, 1, 2, "reflect")), window_holes(Axis(7, 4, 2, 1, 2, "reflect"))
    (0, 1)
    """
    offset, weight = window_table(axis)
    positions = axis.stride * np.arange(axis.out_size)[None, :] + offset + np.arange(weight.shape[0])[:, None]
    return _tap_mask(((weight == 0) & (positions >= 0) & (positions < axis.size)).any(axis=1))


@functools.lru_cache(maxsize=512)
def window_zero_taps(axis: Axis, cover_owned: bool = False) -> int:
    """The taps of ``window_table(axis, cover_owned)`` with a zero weight for some output, inside the axis or not,
    as a bit mask. The fused max-blur needs this wider set: its max map holds -inf (or a neighbour's inf)
    outside ``[0, size)`` too.

    >>> window_zero_taps(Axis(56, 4, 2, 1, 2, "reflect"), True), window_zero_taps(Axis(7, 4, 2, 1, 2, "reflect"))
    (9, 27)
    """
    return _tap_mask((window_table(axis, cover_owned)[1] == 0).any(axis=1))


def _tap_mask(flags: np.ndarray) -> int:
    return sum(1 << d for d, flag in enumerate(flags.tolist()) if flag)


@functools.lru_cache(maxsize=512)
def routing_table(axis: Axis, kmax: int, pmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The max-blur backward along one axis: for each input position, the output band that reaches it.

    ``axis`` is the max map's axis (size M) and the input has ``M + kmax - 1 - 2 pmax`` positions. Input
    position ``p`` sits in slot ``a`` of the max-pool windows at ``r = p - a + pmax``; the blur's gradient
    there is ``sum_i R[i, r] g[i]``. Returns ``base`` (L,) and ``weight`` (L, kmax, D) with
    ``weight[p, a, e] = R[base[p] + e, p - a + pmax]`` (0 where r is outside the max map), so a kernel loads
    the D gradient rows of ``p`` once and forms the kmax window gradients from them.
    """
    idx, w = forward_table(axis)
    dense = np.zeros((axis.out_size, axis.size), dtype=np.float64)
    np.add.at(dense, (np.arange(axis.out_size)[:, None].repeat(idx.shape[1], 1), idx), w)
    length = axis.size + kmax - 1 - 2 * pmax
    slots = np.arange(length)[:, None] - np.arange(kmax)[None, :] + pmax  # (L, kmax) max-map positions
    inside = (slots >= 0) & (slots < axis.size)
    reach = np.zeros((length, kmax, axis.out_size), dtype=np.float64)
    reach[inside] = dense[:, slots[inside]].T
    used = np.abs(reach).sum(axis=1) != 0  # (L, out_size): outputs whose gradient reaches p
    base = np.where(used.any(axis=1), used.argmax(axis=1), 0).astype(np.int32)
    last = np.where(used.any(axis=1), axis.out_size - 1 - used[:, ::-1].argmax(axis=1), 0)
    width = int(max((last - base).max(initial=0) + 1, 1))
    weight = np.zeros((length, kmax, width), dtype=np.float32)
    for e in range(width):
        rows = np.minimum(base + e, axis.out_size - 1)
        weight[:, :, e] = np.where((base + e < axis.out_size)[:, None], reach[np.arange(length), :, rows], 0.0)
    return base, weight  # sums of dyadic taps: exact in fp32


_DEVICE_TABLES: dict[tuple, tuple] = {}
_HOST_TABLES = {
    "forward": forward_table,
    "adjoint": adjoint_table,
    "banded": banded_table,
    "routing": routing_table,
    "window": window_table,
}


def device_table(kind: str, axis: Axis, device: torch.device, *args: int) -> tuple[torch.Tensor, ...]:
    """The ``kind`` table of ``axis`` on ``device``, cached: one host-to-device copy per shape.

    ``forward`` / ``adjoint``: (index int32, weight float32); ``banded``: (base int32, band float32);
    ``routing`` (``args`` = kmax, pmax): (base int32, weight float32); ``window``: (offset int, weight float32).
    Integers stay on the host (they become compile-time constants of the kernels).
    """
    key = (kind, axis, device, *args)
    table = _DEVICE_TABLES.get(key)
    if table is None:
        host = _HOST_TABLES[kind](axis, *args)
        table = tuple(torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a for a in host)
        _DEVICE_TABLES[key] = table
    return table


def codes_per_owner(max_size: int, out_size: int, stride: int) -> int:
    """How many max-map positions one output owns along an axis (GPU kernels write each code once).

    Output ``i`` owns positions ``[s*i, s*i + s)``; the last output also owns everything past them.
    """
    return max(stride, max_size - stride * (out_size - 1), 1)
