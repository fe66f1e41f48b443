"""FFCV drop-in: ``BlurPoolConv2d(conv)`` from ffcv-imagenet, and its ``apply_blurpool`` surgery.

A 3x3 ``[1,2,1]^2/16`` zero-pad blur at stride 1 on the input, then the wrapped conv unchanged (the same
operation as Composer's ``BlurConv2d(blur_first=True)``). Persistent ``blur_filter`` (C_in, 1, 3, 3) and a
``conv`` attribute, as in FFCV. A strided 1x1 conv runs the exact rewrite (blur-pool, then conv at stride 1).

>>> import torch
>>> layer = BlurPoolConv2d(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1))
>>> layer(torch.randn(1, 16, 9, 9)).shape
torch.Size([1, 32, 5, 5])
"""

from __future__ import annotations

from torch import Tensor, nn

from .composer import BlurThenConv, _Blur3x3, _filter3x3

__all__ = ["BlurPoolConv2d", "apply_blurpool"]


class BlurPoolConv2d(BlurThenConv):
    """``BlurPoolConv2d(conv)``: (N, C_in, H, W) -> ``conv(blur(x))``, the shape ``conv`` gives."""

    _LIVE = ("conv",)

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", _filter3x3(conv.in_channels).to(conv.weight.device))
        self.blur = _Blur3x3(1, conv.in_channels)
        self._build()
        self._built = True

    def _build(self) -> None:
        self._setup_blur_then_conv(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self._blur_then_conv(x)


def apply_blurpool(model: nn.Module, min_channels: int = 16) -> nn.Module:
    """ffcv-imagenet's surgery, in place: wrap every ``nn.Conv2d`` with a stride > 1 and
    ``in_channels >= min_channels`` in :class:`BlurPoolConv2d`. Idempotent. Returns ``model``.
    """
    for parent in list(model.modules()):
        if isinstance(parent, BlurPoolConv2d):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= min_channels:
                setattr(parent, name, BlurPoolConv2d(child))
    return model
