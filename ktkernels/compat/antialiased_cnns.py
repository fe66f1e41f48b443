"""antialiased-cnns (Zhang 2019) drop-in: ``BlurPool``, ``BlurPool1D``, ``Downsample``, ``get_pad_layer``.

Same signatures, defaults, attributes (``filt_size``, ``pad_off``, ``pad_sizes``, ``stride``, ``off``,
``channels``, ``pad``) and persistent ``filt`` buffer, so its checkpoints load with ``strict=True``.
One deliberate difference: an input whose channel count differs from ``channels`` raises ``ValueError``
(antialiased-cnns silently returns ``channels`` output channels when they are a multiple of the input's).

>>> import torch
>>> layer = BlurPool(64)                      # filt_size=4, stride=2, reflect
>>> layer(torch.randn(2, 64, 15, 16)).shape
torch.Size([2, 64, 8, 8])
"""

from __future__ import annotations

from torch import nn

from ..blurpool.geometry import canonical_pad_mode
from ..blurpool.modules import BlurPool1d, BlurPool2d

__all__ = ["BlurPool", "BlurPool1D", "Downsample", "get_pad_layer", "get_pad_layer_1d"]

_PAD_LAYERS_2D = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d, "zero": nn.ZeroPad2d}
_PAD_LAYERS_1D = {"reflect": nn.ReflectionPad1d, "replicate": nn.ReplicationPad1d, "zero": nn.ZeroPad1d}


def get_pad_layer(pad_type: str) -> type[nn.Module]:
    """The padding module class for 'refl'/'reflect', 'repl'/'replicate' or 'zero' (2-D)."""
    return _PAD_LAYERS_2D[canonical_pad_mode(pad_type)]


def get_pad_layer_1d(pad_type: str) -> type[nn.Module]:
    """The 1-D padding module class for 'refl'/'reflect', 'repl'/'replicate' or 'zero'."""
    return _PAD_LAYERS_1D[canonical_pad_mode(pad_type)]


class BlurPool(BlurPool2d):
    """``antialiased_cnns.BlurPool``: (N, C, H, W) -> (N, C, floor((H - 1 + 2*pad_off)/stride) + 1, ...).

    Args:
        channels: C (required, as in antialiased-cnns).
        pad_type: 'reflect' (default), 'refl', 'replicate', 'repl' or 'zero'.
        filt_size: 1..7 (default 4); 1 is plain subsampling.
        stride: >= 1 (default 2); 1..4 run fused, larger strides the pad + conv decomposition.
        pad_off: added to every pad.
    """

    def __init__(
        self, channels: int, pad_type: str = "reflect", filt_size: int = 4, stride: int = 2, pad_off: int = 0
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)
        self.pad = get_pad_layer(pad_type)(self.pad_sizes)  # kept for code that reads it; forward never calls it


class BlurPool1D(BlurPool1d):
    """``antialiased_cnns.BlurPool1D``: (N, C, L) -> (N, C, floor((L - 1 + 2*pad_off)/stride) + 1)."""

    def __init__(
        self, channels: int, pad_type: str = "reflect", filt_size: int = 3, stride: int = 2, pad_off: int = 0
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)
        self.pad = get_pad_layer_1d(pad_type)(self.pad_sizes)


class Downsample(BlurPool2d):
    """Pre-2020 ``models_lpf.Downsample(pad_type, filt_size, stride, channels, pad_off)`` argument order."""

    def __init__(
        self,
        pad_type: str = "reflect",
        filt_size: int = 3,
        stride: int = 2,
        channels: int | None = None,
        pad_off: int = 0,
    ) -> None:
        super().__init__(channels, pad_type, filt_size, stride, pad_off)
        self.pad = get_pad_layer(pad_type)(self.pad_sizes)
