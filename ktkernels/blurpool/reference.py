"""Pure-PyTorch blur pooling: the anchors' recipe (pad, then a depthwise conv), which is the spec.

It is written independently of the gather tables in ``geometry.py`` so that tests compare two
derivations of the same maths. It is also the ``torch`` backend.
"""

from __future__ import annotations

from typing import List  # noqa: UP035 (TorchScript reads the annotations)

import torch
import torch.nn.functional as F

from .geometry import binomial_filter2d, binomial_taps, max_pool_output_size, output_size

_TORCH_PAD = {"reflect": "reflect", "replicate": "replicate", "zero": "constant"}


def blur_pool2d_reference(
    x: torch.Tensor, filt_size: int, stride: int, padding: tuple[int, int, int, int], pad_mode: str
) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H_out, W_out) with ``padding = (left, right, top, bottom)``."""
    n, c, h, w = x.shape
    left, right, top, bottom = padding
    h_out = output_size(h, filt_size, stride, top, bottom)
    w_out = output_size(w, filt_size, stride, left, right)
    if n * c == 0:  # conv2d takes no groups=0; an empty spatial axis goes through F.pad like any other
        return x.new_empty((n, c, h_out, w_out))
    xp = F.pad(x, (left, right, top, bottom), mode=_TORCH_PAD[pad_mode])
    filt = binomial_filter2d(filt_size, x.dtype).to(x.device).expand(c, 1, filt_size, filt_size)
    return F.conv2d(xp, filt, stride=stride, groups=c)


def blur_pool1d_reference(
    x: torch.Tensor, filt_size: int, stride: int, padding: tuple[int, int], pad_mode: str
) -> torch.Tensor:
    """(N, C, L) -> (N, C, L_out) with ``padding = (left, right)``."""
    n, c, length = x.shape
    l_out = output_size(length, filt_size, stride, padding[0], padding[1])
    if n * c == 0:  # conv2d takes no groups=0; an empty spatial axis goes through F.pad like any other
        return x.new_empty((n, c, l_out))
    xp = F.pad(x, tuple(padding), mode=_TORCH_PAD[pad_mode])
    taps = torch.tensor(binomial_taps(filt_size), dtype=x.dtype, device=x.device)
    return F.conv1d(xp, taps.expand(c, 1, filt_size), stride=stride, groups=c)


def blur_pool_decomposed(
    x: torch.Tensor,
    taps: List[float],  # noqa: UP006 (TorchScript)
    stride: List[int],  # noqa: UP006
    padding: List[int],  # noqa: UP006
    pad_mode: str,
    spatial: int,
) -> torch.Tensor:
    """``pad`` + depthwise ``conv{spatial}d`` with per-axis ``stride``, for TorchScript, FX and ONNX.

    The taps become a constant and the channel count is read off ``x``, so FX traces it with
    ``channels=None`` and exporters emit ``Pad`` + ``Conv(group=C)``.
    """
    k = len(taps)
    a = torch.tensor(taps, dtype=torch.float64)
    c = x.shape[1]
    if torch.jit.is_tracing():
        # The TorchScript-based ONNX exporter traces sizes as values; a Conv weight must have a static shape.
        c = int(c)
    if pad_mode == "zero":
        xp = F.pad(x, padding)
    else:
        xp = F.pad(x, padding, mode=pad_mode)
    if spatial == 1:
        return F.conv1d(xp, a.view(1, 1, k).to(x).expand(c, 1, k), stride=stride, groups=c)
    return F.conv2d(xp, torch.outer(a, a).view(1, 1, k, k).to(x).expand(c, 1, k, k), stride=stride, groups=c)


def _blur_backward_reference(
    grad: torch.Tensor,
    input_size: tuple[int, ...],
    filt_size: int,
    stride: int,
    padding: tuple[int, ...],
    pad_mode: str,
) -> torch.Tensor:
    """Adjoint of pad + strided depthwise conv, for 1 or 2 spatial dims, without autograd.

    (Autograd does not record inside a custom op, so the ``torch`` backend needs an explicit vjp.)
    The conv's adjoint is ``conv_transpose`` with the output padding that restores the padded size;
    the pad's adjoint is aten's pad backward (fold reflected / replicated borders back in).
    """
    n, c = grad.shape[:2]
    dims = len(input_size)
    padded = [size + padding[2 * (dims - 1 - d)] + padding[2 * (dims - 1 - d) + 1] for d, size in enumerate(input_size)]
    extra = [p - ((o - 1) * stride + filt_size) for p, o in zip(padded, grad.shape[2:], strict=True)]
    taps = torch.tensor(binomial_taps(filt_size), dtype=grad.dtype, device=grad.device)
    if dims == 2:
        weight = torch.outer(taps, taps).expand(c, 1, filt_size, filt_size)
        grad_padded = F.conv_transpose2d(grad, weight, stride=stride, output_padding=extra, groups=c)
    else:
        grad_padded = F.conv_transpose1d(
            grad, taps.expand(c, 1, filt_size), stride=stride, output_padding=extra, groups=c
        )
    if pad_mode == "zero":
        crop = [slice(None), slice(None)]
        for d, size in enumerate(input_size):
            before = padding[2 * (dims - 1 - d)]
            crop.append(slice(before, before + size))
        return grad_padded[tuple(crop)]
    shape_of_input = grad.new_zeros(()).expand(n, c, *input_size)
    backward = {
        ("reflect", 1): torch.ops.aten.reflection_pad1d_backward,
        ("reflect", 2): torch.ops.aten.reflection_pad2d_backward,
        ("replicate", 1): torch.ops.aten.replication_pad1d_backward,
        ("replicate", 2): torch.ops.aten.replication_pad2d_backward,
    }[(pad_mode, dims)]
    return backward(grad_padded, shape_of_input, list(padding))


def blur_pool2d_backward_reference(
    grad: torch.Tensor,
    input_size: tuple[int, int],
    filt_size: int,
    stride: int,
    padding: tuple[int, int, int, int],
    pad_mode: str,
) -> torch.Tensor:
    """Gradient of :func:`blur_pool2d_reference` w.r.t. its (N, C, *input_size) input."""
    return _blur_backward_reference(grad, tuple(input_size), filt_size, stride, tuple(padding), pad_mode)


def blur_pool1d_backward_reference(
    grad: torch.Tensor, input_size: int, filt_size: int, stride: int, padding: tuple[int, int], pad_mode: str
) -> torch.Tensor:
    """Gradient of :func:`blur_pool1d_reference` w.r.t. its (N, C, input_size) input."""
    return _blur_backward_reference(grad, (input_size,), filt_size, stride, tuple(padding), pad_mode)


def max_blur_pool2d_reference(
    x: torch.Tensor,
    kmax: int,
    pmax: int,
    filt_size: int,
    stride: int,
    padding: tuple[int, int, int, int],
    pad_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_pool2d(kmax, stride=1, padding=pmax)`` then the blur pool.

    Also returns the argmax codes, uint8 of shape (N, C, H_m, W_m): ``code = a * kmax + b`` for the
    window offset (a, b) of the element max_pool2d picked.
    """
    n, c, h, w = x.shape
    hm, wm = max_pool_output_size(h, kmax, pmax), max_pool_output_size(w, kmax, pmax)
    if n * c == 0:
        m = x.new_empty((n, c, hm, wm))
        return blur_pool2d_reference(m, filt_size, stride, padding, pad_mode), m.to(torch.uint8)
    m, flat = F.max_pool2d(x, kmax, stride=1, padding=pmax, return_indices=True)
    rows = torch.arange(hm, device=x.device).view(-1, 1)
    cols = torch.arange(wm, device=x.device).view(1, -1)
    a = flat // w - rows + pmax
    b = flat % w - cols + pmax
    codes = (a * kmax + b).to(torch.uint8)
    return blur_pool2d_reference(m, filt_size, stride, padding, pad_mode), codes


def max_blur_pool2d_backward_reference(
    grad: torch.Tensor,
    codes: torch.Tensor,
    input_hw: tuple[int, int],
    kmax: int,
    pmax: int,
    filt_size: int,
    stride: int,
    padding: tuple[int, int, int, int],
    pad_mode: str,
) -> torch.Tensor:
    """Route the blur's gradient on the max map to the argmax element of each window."""
    n, c, hm, wm = codes.shape
    h, w = input_hw
    grad_m = blur_pool2d_backward_reference(grad, (hm, wm), filt_size, stride, padding, pad_mode)
    # Scatter into a padded frame: window (r, c) offset (a, b) is padded pixel (r + a, c + b).
    framed = grad.new_zeros((n, c, h + 2 * pmax, w + 2 * pmax))
    for a in range(kmax):
        for b in range(kmax):
            hit = codes == a * kmax + b
            framed[:, :, a : a + hm, b : b + wm] += torch.where(hit, grad_m, 0)
    return framed[:, :, pmax : pmax + h, pmax : pmax + w]


def max_map_gather(v: torch.Tensor, codes: torch.Tensor, kmax: int, pmax: int) -> torch.Tensor:
    """The (N, C, H_m, W_m) max map read from ``v`` (N, C, H, W) at the elements the ``codes`` picked, 0 where a
    code picks padding: the adjoint of the scatter in :func:`max_blur_pool2d_backward_reference`, and
    ``max_pool2d``'s tangent map (``v`` a tangent of its input)."""
    hm, wm = codes.shape[2:]
    framed = F.pad(v, (pmax, pmax, pmax, pmax))
    picked = v.new_zeros(codes.shape)
    for a in range(kmax):
        for b in range(kmax):
            picked = torch.where(codes == a * kmax + b, framed[:, :, a : a + hm, b : b + wm], picked)
    return picked
