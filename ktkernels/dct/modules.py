"""The DCT API: ``dct2d`` / ``idct2d`` / ``dct`` / ``idct``, the ``DCT2d`` / ``IDCT2d`` modules and
``dct_attention_map``.

Matches ``scipy.fft.dctn(x, type=2, norm=...)`` and ``idctn`` exactly in float64, for any sizes >= 1:

    >>> import torch, scipy.fft
    >>> x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    >>> y = dct2d(x)                                     # (2, 3, 7, 5), orthonormal DCT-II over (H, W)
    >>> torch.allclose(y, torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")))
    True
    >>> torch.allclose(idct2d(y), x)
    True
    >>> dct2d(x, keep=(2, 2)).shape                      # only the low-frequency block is computed
    torch.Size([2, 3, 2, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..autograd import apply
from ..checks import int_pair, is_int
from . import op
from .basis import canonical_norm


def _keep_pair(keep: int | Sequence[int] | None, name: str) -> list[int] | None:
    """``keep`` as [kh, kw] of ints >= 1 (numpy's too), or None: TypeError for another form, ValueError below 1."""
    if keep is None:
        return None
    pair = int_pair(keep)
    if pair is None:
        raise TypeError(f"{name}: keep must be an int or a pair of ints (kh, kw), got {keep!r}")
    if min(pair) < 1:
        raise ValueError(f"{name}: keep must be >= 1, got {keep!r}")
    return list(pair)


def _keep(x: Tensor, keep: int | Sequence[int] | None) -> list[int]:
    op.check_input(x, 2, "dct2d")
    pair = _keep_pair(keep, "dct2d")
    if pair is None:
        return list(x.shape[-2:])
    if any(k > size for k, size in zip(pair, x.shape[-2:], strict=True)):
        raise ValueError(f"dct2d: keep {pair} exceeds the transformed size {list(x.shape[-2:])}")
    return pair


def dct2d(x: Tensor, norm: str | None = "ortho", keep: int | Sequence[int] | None = None) -> Tensor:
    """2-D DCT-II over the last two dims of ``x`` (..., H, W) -> (..., H, W), or (..., kh, kw) with ``keep``.

    ``norm``: 'ortho' (orthonormal) or None (scipy's unnormalised 'backward'). ``keep=(kh, kw)`` computes and
    returns only the top-left low-frequency block; its gradient is exact. fp32/fp16/bf16 accumulate in fp32
    (the basis is fp32), fp64 in fp64. A channels_last (N, C, H, W) input is read in place and the output keeps
    its layout.
    """
    return apply(op.dct_transform, x, "dct", canonical_norm(norm), _keep(x, keep), False)


def idct2d(x: Tensor, norm: str | None = "ortho") -> Tensor:
    """Inverse of :func:`dct2d` (a 2-D DCT-III, ``scipy.fft.idctn``): (..., H, W) -> (..., H, W)."""
    op.check_input(x, 2, "idct2d")
    return apply(op.dct_transform, x, "idct", canonical_norm(norm), list(x.shape[-2:]), False)


def _along(x: Tensor, dim: int, kind: str, norm: str | None) -> Tensor:
    op.check_input(x, 1, kind)
    if not is_int(dim) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{kind}: dim {dim!r} is out of range for a {x.dim()}-D tensor")
    dim = int(dim)
    moved = x.movedim(dim, -1)
    return apply(op.dct_transform, moved, kind, canonical_norm(norm), [moved.shape[-1]], False).movedim(-1, dim)


def dct(x: Tensor, dim: int = -1, norm: str | None = "ortho") -> Tensor:
    """1-D DCT-II along ``dim`` (``scipy.fft.dct(x, type=2, axis=dim, norm=...)``); shape unchanged."""
    return _along(x, dim, "dct", norm)


def idct(x: Tensor, dim: int = -1, norm: str | None = "ortho") -> Tensor:
    """Inverse of :func:`dct` along ``dim`` (``scipy.fft.idct``, a DCT-III); shape unchanged."""
    return _along(x, dim, "idct", norm)


def dct_attention_map(
    features: Tensor, p: float = 2, norm: str | None = "ortho", keep: int | Sequence[int] | None = None
) -> Tensor:
    """``dct2d(mean_c |F|^p)``: (N, C, H, W) features -> (N, H, W) (or (N, kh, kw)) DCT coefficients, in fp32.

    The channel reduction reads the features once (in their own layout) and its backward is one fused
    elementwise pass; the map is fp32 (fp64 for fp64 features) because it feeds a loss. ``p >= 1``; the
    DCT-attention distillation of Lopez-Cifuentes et al. uses p = 2 (mean of squares).

    >>> import torch
    >>> dct_attention_map(torch.randn(2, 16, 7, 7)).shape
    torch.Size([2, 7, 7])
    """
    op.check_power(features, p, "dct_attention_map")
    return dct2d(apply(op.channel_power_mean, features, float(p)), norm, keep)


class DCT2d(nn.Module):
    """Module form of :func:`dct2d`: (..., H, W) -> (..., H, W) or (..., kh, kw)."""

    def __init__(self, norm: str | None = "ortho", keep: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.norm = canonical_norm(norm) if norm is not None else None
        _keep_pair(keep, "DCT2d")  # a bad keep fails here, not at the first forward
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        return dct2d(x, self.norm, self.keep)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, keep={self.keep}"


class IDCT2d(nn.Module):
    """Module form of :func:`idct2d`: (..., H, W) -> (..., H, W)."""

    def __init__(self, norm: str | None = "ortho") -> None:
        super().__init__()
        self.norm = canonical_norm(norm) if norm is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return idct2d(x, self.norm)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"
