"""Pure-PyTorch DCT: the basis-matrix products (the spec every backend is tested against, and the ``torch``
backend). Computed in float64 when the input is float64, else in float32, and cast back."""

from __future__ import annotations

import torch

from .basis import matrix


def transform_reference(x: torch.Tensor, kind: str, norm: str, out_size: list[int], adjoint: bool) -> torch.Tensor:
    """``kind`` over the last ``len(out_size)`` dims of ``x``, forward (rows truncated to ``out_size``) or adjoint."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work)
    for axis, out in zip(range(-len(out_size), 0), out_size, strict=True):
        n, rows = (out, y.shape[axis]) if adjoint else (y.shape[axis], out)
        m = torch.from_numpy(matrix(kind, n, norm)[:rows]).to(device=x.device, dtype=work)
        m = m.T if adjoint else m  # (out, in) along this axis
        y = torch.movedim(torch.tensordot(y, m, dims=([axis], [1])), -1, axis)
    return y.to(x.dtype)


def channel_power_mean_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): ``mean_c |x|^p`` in float32 (float64 for float64 input)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(work).abs().pow(p).mean(dim=1)


def channel_power_mean_backward_reference(x: torch.Tensor, grad_map: torch.Tensor, p: float) -> torch.Tensor:
    """d/dx of ``mean_c |x|^p`` times ``grad_map``: ``(p/C) |x|^(p-1) sign(x) g``."""
    work = grad_map.dtype
    xw = x.to(work)
    return (p / x.shape[1] * xw.abs().pow(p - 1) * xw.sign() * grad_map[:, None]).to(x.dtype)
