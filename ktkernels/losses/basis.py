"""The small tables the transfer-loss kernels multiply by: the global term's projection rows and the 2-D
transforms of the DCT-KD attention maps. Built in float64 with numpy, cached per device and dtype."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..dct.basis import matrix

# Map kinds of the attention-map distance, in the order of the C++ kernels' integer codes.
MAP_KINDS = ("at_code", "at_paper", "dct_a", "dct_b", "dct")


@functools.lru_cache(maxsize=128)
def _projection_rows(mode: str, keep: int, h: int, w: int) -> np.ndarray:
    if mode == "none":
        return np.zeros((0, h * w))
    if mode in ("gap", "cosine"):
        return np.full((1, h * w), 1.0 / (h * w))
    kh, kw = min(keep, h), min(keep, w)
    rows = np.einsum("uh,vw->uvhw", matrix("dct", h, "ortho")[:kh], matrix("dct", w, "ortho")[:kw])
    return np.ascontiguousarray(rows.reshape(kh * kw, h * w) / math.sqrt(h * w))


def projection_basis(mode: str, keep: int, h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(J, H*W) rows B_j with ``P[n, c, j] = sum_hw B[j, hw] F[n, c, hw]``: what the global term compares.

    'gap' and 'cosine': one row of 1/(HW), the global average pool. 'dct_lowpass': the kh x kw lowest
    orthonormal DCT-II basis images divided by sqrt(HW) (kh = min(keep, H)), so that keep=1 is exactly the
    GAP and keeping every frequency turns the global term into the pixel term (Parseval). 'none': no rows.
    """
    return _cached(("proj", mode, keep, h, w), dtype, device, lambda: _projection_rows(mode, keep, h, w))


@functools.lru_cache(maxsize=128)
def _map_tables(kind: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    if kind in ("dct_a", "dct_b"):

        def cos_sin(n: int) -> np.ndarray:
            angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
            return np.stack([np.cos(angle), np.sin(angle)])

        return cos_sin(h), cos_sin(w)
    if kind == "dct":
        return (
            np.stack([matrix("dct", h, "ortho"), np.zeros((h, h))]),
            np.stack([matrix("dct", w, "ortho"), np.zeros((w, w))]),
        )
    return np.zeros((2, 0, 0)), np.zeros((2, 0, 0))


def map_tables(kind: str, h: int, w: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (2, H, H), right (2, W, W)) with the map transform ``R = L0 Z R0^T - L1 Z R1^T``.

    'dct_a' / 'dct_b': cos and sin of 2 pi k x / n, so R = Re FFT2(Z) (the DCT-KD code's "DCT");
    'dct': the orthonormal DCT-II and zeros; the AT kinds use no transform: (2, 0, 0) each.
    """
    left, right = _map_tables(kind, h, w)
    return (
        _cached(("left", kind, h), dtype, device, lambda: left),
        _cached(("right", kind, w), dtype, device, lambda: right),
    )


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, dtype: torch.dtype, device, build) -> torch.Tensor:
    full_key = (*key, dtype, torch.device(device))
    table = _DEVICE_CACHE.get(full_key)
    if table is None:
        table = torch.from_numpy(np.ascontiguousarray(build())).to(device=device, dtype=dtype)
        _DEVICE_CACHE[full_key] = table
    return table
