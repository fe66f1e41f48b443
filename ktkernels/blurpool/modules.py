"""Blur-pool modules and functional API (antialiased-cnns argument order and state-dict keys).

Example::

    >>> import torch, ktkernels
    >>> layer = ktkernels.BlurPool2d(64)                  # filt_size=4, stride=2, reflect
    >>> layer(torch.randn(8, 64, 56, 56)).shape
    torch.Size([8, 64, 28, 28])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import op
from .geometry import adobe_pads, binomial_filter2d, binomial_taps, canonical_pad_mode


def _padding(padding: int | Sequence[int] | None, filt_size: int, stride: int, sides: int) -> list[int]:
    """Validated pads. None -> antialiased-cnns pads ((k-1)//2, ceil((k-1)/2)) per axis; int -> every side.

    Types are checked here, before the dispatcher, so bad values raise TypeError/ValueError naming them.
    """
    op.check_blur_params(filt_size, stride, [])
    if padding is None:
        pads = list(adobe_pads(filt_size)) * (sides // 2)
    elif isinstance(padding, int) and not isinstance(padding, bool):
        pads = [padding] * sides
    else:
        pads = list(padding)
        if len(pads) != sides:
            raise ValueError(f"padding must be an int or {sides} ints, got {pads}")
    for p in pads:
        op.check_int("each pad", p, 0)
    return pads


def blur_pool2d(
    x: Tensor,
    filt_size: int = 4,
    stride: int = 2,
    padding: int | Sequence[int] | None = None,
    pad_mode: str = "reflect",
) -> Tensor:
    """Blur-pooled downsampling of ``x`` (N, C, H, W) -> (N, C, H_out, W_out).

    ``y = conv2d(pad(x), a a^T / 4^(k-1), stride, groups=C)`` with ``a`` row ``filt_size`` of
    Pascal's triangle, ``padding = (left, right, top, bottom)`` (default: antialiased-cnns',
    ``((k-1)//2, ceil((k-1)/2))`` per axis) and ``H_out = (H + top + bottom - k) // stride + 1``.
    ``pad_mode``: 'reflect' | 'replicate' | 'zero' (aliases 'refl', 'repl', 'constant').

    >>> blur_pool2d(torch.randn(2, 3, 7, 9)).shape
    torch.Size([2, 3, 4, 5])
    """
    pads = _padding(padding, filt_size, stride, 4)
    return op.blur_pool2d(x, filt_size, stride, pads, canonical_pad_mode(pad_mode))


def blur_pool1d(
    x: Tensor,
    filt_size: int = 3,
    stride: int = 2,
    padding: int | Sequence[int] | None = None,
    pad_mode: str = "reflect",
) -> Tensor:
    """Blur-pooled downsampling of ``x`` (N, C, L) -> (N, C, L_out), ``padding = (left, right)``.

    >>> blur_pool1d(torch.arange(1.0, 6.0).view(1, 1, 5))
    tensor([[[1.5000, 3.0000, 4.5000]]])
    """
    pads = _padding(padding, filt_size, stride, 2)
    return op.blur_pool1d(x, filt_size, stride, pads, canonical_pad_mode(pad_mode))


def max_blur_pool2d(
    x: Tensor,
    filt_size: int = 4,
    stride: int = 2,
    padding: int | Sequence[int] | None = None,
    pad_mode: str = "reflect",
    max_kernel: int = 2,
    max_padding: int = 0,
) -> Tensor:
    """``blur_pool2d(max_pool2d(x, max_kernel, stride=1, padding=max_padding))`` in one kernel.

    (N, C, H, W) -> (N, C, H_out, W_out) where the blur runs on the (H + 2p - k_max + 1)-sized max map,
    which is never written to memory. ``max_kernel=2, max_padding=0`` is the antialiased-cnns/kornia
    stem; ``max_kernel=3, max_padding=1`` the DenseNet one.

    >>> max_blur_pool2d(torch.randn(2, 3, 112, 112)).shape
    torch.Size([2, 3, 56, 56])
    """
    pads = _padding(padding, filt_size, stride, 4)
    op.check_max(max_kernel, max_padding)
    y, _ = op.max_blur_pool2d(x, max_kernel, max_padding, filt_size, stride, pads, canonical_pad_mode(pad_mode))
    return y


class _BlurBase(nn.Module):
    """Shared constructor: antialiased-cnns attributes and a persistent ``filt`` buffer."""

    spatial_dims = 2

    def __init__(self, channels: int | None, pad_type: str, filt_size: int, stride: int, pad_off: int) -> None:
        super().__init__()
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.pad_off = pad_off
        self.pad_type = canonical_pad_mode(pad_type)
        op.check_blur_params(filt_size, stride, [])
        self.off = (stride - 1) // 2
        self.pad_sizes = list(adobe_pads(filt_size, pad_off)) * self.spatial_dims
        if any(p < 0 for p in self.pad_sizes):
            raise ValueError(f"pad_off={pad_off} gives negative pads {self.pad_sizes} for filt_size={filt_size}")
        # Persistent (C, 1, k, k) like antialiased-cnns, so its checkpoints load with strict=True.
        # The kernels use exact taps and never read it.
        if self.spatial_dims == 2:
            filt = binomial_filter2d(filt_size)[None, None]
        else:
            filt = torch.tensor(binomial_taps(filt_size), dtype=torch.float32)[None, None]
        self.register_buffer("filt", filt.repeat(channels or 1, *([1] * (filt.dim() - 1))))

    def _check_channels(self, x: Tensor) -> None:
        if self.channels is not None and x.dim() >= 2 and x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.channels} channels, got an input with {x.shape[1]}"
            )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, pad_type={self.pad_type!r}, filt_size={self.filt_size}, "
            f"stride={self.stride}, pad_off={self.pad_off}"
        )


class BlurPool2d(_BlurBase):
    """Drop-in for ``antialiased_cnns.BlurPool``: (N, C, H, W) -> (N, C, ceil(H/stride), ceil(W/stride)).

    Args:
        channels: expected C, or None to take it from the input. A mismatch raises ``ValueError``.
        pad_type: 'reflect' (default) | 'replicate' | 'zero', or 'refl' / 'repl'.
        filt_size: binomial filter size, 1..7 (default 4).
        stride: 1..4 (default 2).
        pad_off: added to every pad (antialiased-cnns semantics).
    """

    def __init__(
        self,
        channels: int | None = None,
        pad_type: str = "reflect",
        filt_size: int = 4,
        stride: int = 2,
        pad_off: int = 0,
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        return op.blur_pool2d(x, self.filt_size, self.stride, self.pad_sizes, self.pad_type)


class BlurPool1d(_BlurBase):
    """Drop-in for ``antialiased_cnns.BlurPool1D``: (N, C, L) -> (N, C, ceil(L/stride)); filt_size default 3."""

    spatial_dims = 1

    def __init__(
        self,
        channels: int | None = None,
        pad_type: str = "reflect",
        filt_size: int = 3,
        stride: int = 2,
        pad_off: int = 0,
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        return op.blur_pool1d(x, self.filt_size, self.stride, self.pad_sizes, self.pad_type)


class MaxBlurPool2d(_BlurBase):
    """``MaxPool2d(max_kernel, stride=1, padding=max_padding)`` then ``BlurPool2d``, fused.

    (N, C, H, W) -> (N, C, ceil(H_m/stride), ceil(W_m/stride)) with H_m = H + 2*max_padding - max_kernel + 1.
    The defaults are the antialiased-cnns ResNet stem (MaxPool2d(2, 1) + BlurPool(k=4, reflect)).
    The backward keeps only uint8 argmax codes, not the max map or int64 indices.
    """

    def __init__(
        self,
        channels: int | None = None,
        pad_type: str = "reflect",
        filt_size: int = 4,
        stride: int = 2,
        pad_off: int = 0,
        max_kernel: int = 2,
        max_padding: int = 0,
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)
        op.check_max(max_kernel, max_padding)
        self.max_kernel = max_kernel
        self.max_padding = max_padding

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        y, _ = op.max_blur_pool2d(
            x, self.max_kernel, self.max_padding, self.filt_size, self.stride, self.pad_sizes, self.pad_type
        )
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_kernel={self.max_kernel}, max_padding={self.max_padding}"
