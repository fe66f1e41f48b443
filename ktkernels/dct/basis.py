"""The DCT as matrices: the basis every backend multiplies by, on each of the last two axes.

scipy's definitions (``scipy.fft.dct(x, type=2, norm=...)`` and its inverse ``idct``, a DCT-III), for length n:

    DCT-II:   y[k] = 2 * sum_i x[i] cos(pi k (2i + 1) / (2n))                   (norm=None, "backward")
              times sqrt(1/(4n)) for k = 0 and sqrt(1/(2n)) otherwise             (norm="ortho")
    inverse:  the matrix inverse: the transpose for "ortho"; for None,
              x[i] = (y[0] + 2 sum_{k>=1} y[k] cos(pi k (2i + 1) / (2n))) / (2n)

A 2-D transform of an (H, W) map X is ``Y = M_H X M_W^T``; keeping the (kh, kw) low-frequency block uses
the first kh (kw) rows. Its gradient is ``dX = M_H^T dY M_W``: the same separable product with the
transposed matrices, which is why one kernel per backend serves the forward and the backward.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

NORMS = ("ortho", "backward")
NORM_ALIASES = {"ortho": "ortho", None: "backward", "backward": "backward"}
KINDS = ("dct", "idct")


def canonical_norm(norm: str | None) -> str:
    """'ortho' or 'backward' (scipy's norm=None)."""
    if norm not in NORM_ALIASES:
        raise ValueError(f"norm must be 'ortho' or None (scipy's 'backward'), got {norm!r}")
    return NORM_ALIASES[norm]


@functools.lru_cache(maxsize=256)
def matrix(kind: str, n: int, norm: str) -> np.ndarray:
    """The (n, n) float64 matrix of the length-n ``kind`` transform ('dct' = DCT-II, 'idct' = its inverse)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    cos = np.cos(np.pi * k * (2 * i + 1) / (2 * n))  # [k, i]
    if norm == "ortho":
        scale = np.full((n, 1), np.sqrt(2.0 / n))
        scale[0] = np.sqrt(1.0 / n)
        dct = scale * cos
        return np.ascontiguousarray(dct if kind == "dct" else dct.T)
    if kind == "dct":
        return 2.0 * cos
    weight = np.full((1, n), 2.0)
    weight[0, 0] = 1.0
    return np.ascontiguousarray((cos.T * weight) / (2 * n))  # [i, k]


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def device_matrix(
    kind: str, n: int, norm: str, rows: int, adjoint: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The first ``rows`` rows of the ``kind`` matrix (transposed when ``adjoint``), contiguous, cached.

    ``dtype`` is float32 for fp32/fp16/bf16 inputs (the basis stays fp32) and float64 for fp64.
    """
    key = (kind, n, norm, rows, adjoint, dtype, device)
    table = _DEVICE_CACHE.get(key)
    if table is None:
        m = matrix(kind, n, norm)[:rows]
        table = torch.from_numpy(np.ascontiguousarray(m.T if adjoint else m)).to(device=device, dtype=dtype)
        _DEVICE_CACHE[key] = table
    return table
