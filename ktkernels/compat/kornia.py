"""kornia drop-in (``kornia.filters``): ``BlurPool2D``, ``MaxBlurPool2D``, ``blur_pool2d``, ``max_blur_pool2d``.

kornia 0.9 semantics by default: zero padding ``((k-1)//2, k//2)``, so ``H_out = ceil(H/stride)``, the
same values as antialiased-cnns with ``pad_type='zero'``. ``legacy_even_padding=True`` gives kornia <= 0.8
(``(k-1)//2`` on both sides: one row short for even k and odd H). Odd k is identical in both.
The kernel is a non-persistent buffer ``kernel`` (k, k) as in 0.9; a legacy ``kernel`` key from a
2021-2023 checkpoint is checked and dropped on load.

>>> import torch
>>> blur_pool2d(torch.eye(5)[None, None], 3)
tensor([[[[0.3125, 0.0625, 0.0000],
          [0.0625, 0.3750, 0.0625],
          [0.0000, 0.0625, 0.3125]]]])
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..blurpool import op
from ..blurpool.geometry import binomial_filter2d, flavour_pads
from ..blurpool.modules import BlurLayer
from ..checks import is_int

__all__ = ["BlurPool2D", "MaxBlurPool2D", "blur_pool2d", "max_blur_pool2d"]


def _square_kernel(kernel_size: int | tuple[int, int]) -> int:
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
            shape = (1, 1, *kernel_size)
            raise ValueError(f"Invalid kernel shape. Expect CxC_(out, None)xNxN, Got torch.Size({list(shape)})")
        kernel_size = kernel_size[0]
    op.check_int("kernel_size", kernel_size, 1)
    return kernel_size


def _warn_ceil_mode(ceil_mode: bool | None) -> None:
    if ceil_mode is not None:
        warnings.warn(
            "`ceil_mode` has no effect: the max pool runs at stride 1 (deprecated in kornia 0.9).",
            DeprecationWarning,
            stacklevel=3,
        )


class _KorniaLayer(BlurLayer):
    def __init__(self, kernel_size, stride, legacy_even_padding: bool, max_pool_size: int = 1) -> None:
        super().__init__()
        k = _square_kernel(kernel_size)
        pair = isinstance(stride, (tuple, list)) and len(stride) == 2
        strides = [stride, stride] if is_int(stride) else list(stride) if pair else []
        if not strides or not all(is_int(s) for s in strides):
            raise ValueError(f"stride must be an int or a pair of ints, got {stride!r}")
        strides = [int(s) for s in strides]
        flavour = "kornia_legacy" if legacy_even_padding else "kornia09"
        pads = [*flavour_pads(flavour, k, strides[1]), *flavour_pads(flavour, k, strides[0])]
        self._configure(
            spatial_dims=2,
            filt_size=k,
            stride=strides,
            padding=pads,
            pad_mode="zero",
            channels=None,
            max_kernel=max_pool_size,
        )
        self.kernel_size = kernel_size
        self.stride = stride
        self.legacy_even_padding = legacy_even_padding
        self.register_buffer("kernel", binomial_filter2d(k), persistent=False)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} is a network layer and expects a floating-point feature map, got {x.dtype}"
            )
        return super()._forward_eager(x)

    def _fixed_filters(self) -> dict[str, Tensor]:
        return {"kernel": binomial_filter2d(self._filt_size)}

    def _legacy_state_keys(self) -> tuple[str, ...]:
        return ("kernel",)  # 2021-2023 kornia saved the (k, k) kernel


class BlurPool2D(_KorniaLayer):
    """``kornia.filters.BlurPool2D``: (B, C, H, W) -> (B, C, ceil(H/stride), ceil(W/stride)).

    Args:
        kernel_size: binomial filter size, an int or a square tuple.
        stride: int (or a pair).
        legacy_even_padding: kornia <= 0.8 padding for even sizes.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int = 2, legacy_even_padding: bool = False):
        super().__init__(kernel_size, stride, legacy_even_padding)


class MaxBlurPool2D(_KorniaLayer):
    """``kornia.filters.MaxBlurPool2D``: ``max_pool2d(max_pool_size, stride=1)`` then the blur pool.

    (B, C, H, W) -> (B, C, ceil((H - m + 1)/stride), ...) for ``m = max_pool_size``; fused for m = 2.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int = 2,
        max_pool_size: int = 2,
        ceil_mode: bool | None = None,
        legacy_even_padding: bool = False,
    ) -> None:
        _warn_ceil_mode(ceil_mode)
        super().__init__(kernel_size, stride, legacy_even_padding, max_pool_size)
        self.max_pool_size = max_pool_size
        self.ceil_mode = bool(ceil_mode)


def blur_pool2d(
    input: Tensor, kernel_size: int | tuple[int, int], stride: int = 2, legacy_even_padding: bool = False
) -> Tensor:
    """``kornia.filters.blur_pool2d``: (B, C, H, W) -> (B, C, ceil(H/stride), ceil(W/stride))."""
    return _layer(BlurPool2D, kernel_size, stride, legacy_even_padding)(input)


def max_blur_pool2d(
    input: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int = 2,
    max_pool_size: int = 2,
    ceil_mode: bool | None = None,
    legacy_even_padding: bool = False,
) -> Tensor:
    """``kornia.filters.max_blur_pool2d``: max pool (stride 1) then blur pool, (B, C, H, W) in."""
    _warn_ceil_mode(ceil_mode)
    return _layer(MaxBlurPool2D, kernel_size, stride, max_pool_size, None, legacy_even_padding)(input)


_LAYERS: dict[tuple, BlurLayer] = {}


def _layer(cls: type, *args) -> BlurLayer:
    """Functional calls reuse one stateless layer per argument set (no buffers are read)."""
    key = (cls, *(tuple(a) if isinstance(a, list) else a for a in args))
    layer = _LAYERS.get(key)
    if layer is None:
        layer = _LAYERS[key] = cls(*args)
    return layer
