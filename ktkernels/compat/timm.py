"""timm drop-in (``timm.layers``): ``BlurPool2d`` and the ``create_aa`` factory.

timm pads ``p = ((stride-1) + (filt_size-1)) // 2`` on every side, so at stride 2 odd k equals
antialiased-cnns reflect, while even k shifts the grid by one pixel and adds a row for even H.
That is reproduced as is. The filter is a non-persistent buffer ``filt`` (C or 1, 1, k, k).
``pad_mode='constant'`` means zero padding.

>>> import torch
>>> BlurPool2d(filt_size=4)(torch.randn(1, 8, 8, 8)).shape
torch.Size([1, 8, 5, 5])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..blurpool.geometry import binomial_filter2d, flavour_pads
from ..blurpool.modules import BlurLayer
from ..checks import is_int

__all__ = ["BlurPool2d", "create_aa"]


class BlurPool2d(BlurLayer):
    """``timm.layers.BlurPool2d``: (N, C, H, W) -> (N, C, (H + 2p - k)//stride + 1, ...).

    Args:
        channels: C, or None to take it from the input.
        filt_size: binomial filter size >= 2 (default 3).
        stride: downsampling stride (default 2).
        pad_mode: 'reflect' (default), 'replicate', 'constant' (zero) or 'circular' (pad + conv, not fused).
        device, dtype: of the ``filt`` buffer (``device='meta'`` defers it; see ``init_non_persistent_buffers``).
    """

    def __init__(
        self,
        channels: int | None = None,
        filt_size: int = 3,
        stride: int = 2,
        pad_mode: str = "reflect",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not is_int(filt_size) or filt_size < 2:
            raise ValueError(f"timm BlurPool2d needs filt_size > 1, got {filt_size!r}")
        filt_size = int(filt_size)
        p = flavour_pads("timm", filt_size, stride)[0]
        self._configure(
            spatial_dims=2,
            filt_size=filt_size,
            stride=stride,
            padding=[p] * 4,
            pad_mode=pad_mode,
            channels=channels,
            decomposed_pad_modes=("circular",),  # timm takes any F.pad mode; this one runs pad + conv
        )
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.pad_mode = pad_mode
        self.padding = [p] * 4
        filt_shape = (channels or 1, 1, filt_size, filt_size)
        self.register_buffer("filt", torch.empty(filt_shape, device=device, dtype=dtype), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill the non-persistent ``filt`` buffer (the kernels use exact taps and never read it)."""
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute ``filt``, e.g. after building on the meta device."""
        if self.filt.device.type == "meta":
            return
        with torch.no_grad():
            self.filt.copy_(binomial_filter2d(self.filt_size).expand(self.filt.shape))


def _normalise_aa_layer(aa_layer: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if not isinstance(aa_layer, str):
        return aa_layer
    key = aa_layer.lower().replace("_", "").replace("-", "")
    if key in ("avg", "avgpool"):
        return nn.AvgPool2d
    if key in ("blur", "blurpool"):
        return BlurPool2d
    if key == "blurpc":
        return partial(BlurPool2d, pad_mode="constant")
    raise ValueError(f"Unknown anti-aliasing layer ({aa_layer!r}); expected 'avg', 'blur', 'blurpc' or a callable")


def _is_blurpool(layer: Callable[..., nn.Module]) -> bool:
    cls = layer.func if isinstance(layer, partial) else layer
    return isinstance(cls, type) and issubclass(cls, BlurPool2d)


def create_aa(
    aa_layer: str | Callable[..., nn.Module] | None,
    channels: int | None = None,
    stride: int = 2,
    enable: bool = True,
    noop: type[nn.Module] | None = nn.Identity,
    device=None,
    dtype=None,
) -> nn.Module | None:
    """``timm.layers.create_aa``: an anti-aliasing layer from a string ('avg', 'blur', 'blurpc'), class or partial.

    Returns ``noop()`` (or None) when ``aa_layer`` is empty or ``enable`` is False. Layers that do not take
    ``channels`` (AvgPool2d) are called as ``layer(stride)``.
    """
    if not aa_layer or not enable:
        return noop() if noop is not None else None
    layer = _normalise_aa_layer(aa_layer)
    kwargs = {"channels": channels, "stride": stride}
    if _is_blurpool(layer):
        preset = layer.keywords if isinstance(layer, partial) else {}
        kwargs.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None and k not in preset})
    try:
        return layer(**kwargs)
    except TypeError:
        return layer(stride)
