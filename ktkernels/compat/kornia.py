"""kornia drop-in (``kornia.filters``): ``BlurPool2D``, ``MaxBlurPool2D``, ``EdgeAwareBlurPool2D`` and their
functionals.

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
import torch.nn.functional as F
from torch import Tensor, nn

from .. import blurpool
from ..blurpool import op
from ..blurpool.geometry import MAX_FILT_SIZE, binomial_filter2d, flavour_pads
from ..blurpool.modules import BlurLayer
from ..checks import int_pair, is_real

__all__ = [
    "BlurPool2D",
    "EdgeAwareBlurPool2D",
    "MaxBlurPool2D",
    "blur_pool2d",
    "edge_aware_blur_pool2d",
    "max_blur_pool2d",
]


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
        pair = int_pair(stride)
        if pair is None:
            raise ValueError(f"stride must be an int or a pair of ints, got {stride!r}")
        strides = list(pair)
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


def _check_dilation(size: int) -> int:
    size = op.check_int("edge_dilation_kernel_size", size, 1)
    if size % 2 == 0:
        raise ValueError(f"edge_dilation_kernel_size must be an odd positive integer, got {size}")
    return size


def _reflect_extend(x: Tensor, before: int, after: int) -> Tensor:
    """``x`` reflect-padded on H and W by any amount, as kornia pads its blur input: in chunks ``F.pad`` accepts
    (at most size - 1), i.e. the periodic reflection of x."""
    for axis in (0, 1):  # H, then W: reflection is separable
        b, a = before, after
        while b > 0 or a > 0:
            size = x.shape[2 + axis]
            chunk = (min(b, size - 1), min(a, size - 1))
            x = F.pad(x, (0, 0, *chunk) if axis == 0 else (*chunk, 0, 0), mode="reflect")
            b, a = b - chunk[0], a - chunk[1]
    return x


def _blur_same_size(x: Tensor, k: int) -> Tensor:
    """The k x k binomial blur at stride 1 with a reflected border (window ``(k-1)//2`` before, ``k//2`` after):
    the fused op while one reflection covers the window, else the reflect-extended input blurred unpadded. Both
    go through layers, so that ``decomposed()`` (and ONNX export) sees pad + conv here too."""
    before, after = (k - 1) // 2, k // 2
    if after < min(x.shape[-2:]) and k <= MAX_FILT_SIZE:
        return _layer(blurpool.BlurPool2d, None, "reflect", k, 1)(x)  # antialiased-cnns' pads at stride 1
    extended = _reflect_extend(x, before, after)
    return _layer(BlurPool2D, k, 1, False)(extended)[..., before : before + x.shape[-2], before : before + x.shape[-1]]


def edge_aware_blur_pool2d(
    input: Tensor,
    kernel_size: int | tuple[int, int],
    edge_threshold: float = 1.25,
    edge_dilation_kernel_size: int = 3,
    epsilon: float = 1e-6,
) -> Tensor:
    """``kornia.filters.edge_aware_blur_pool2d``: (B, C, H, W) -> (B, C, H, W), nothing downsampled.

    Pixels on an edge keep their value; the others take the k x k binomial blur at stride 1 with a reflected
    border (fp32 accumulation). A pixel is on an edge when, along H or W, the channel mean of ``log2(x + epsilon)``
    changes by more than ``log2(edge_threshold)`` (> 0) between the pixels two before and two after it (the input
    reflected by 2 at the border, so H, W >= 3); the edge map is dilated by a max pool of the odd
    ``edge_dilation_kernel_size``. The edge test runs in the input's dtype, as kornia's does.
    """
    k = _square_kernel(kernel_size)
    op.check_input(input, 2, "edge_aware_blur_pool2d")
    dilation = _check_dilation(edge_dilation_kernel_size)
    if not is_real(edge_threshold) or not edge_threshold > 1.0:
        raise ValueError(f"edge_threshold must be greater than 1, got {edge_threshold!r}")
    if min(input.shape[-2:]) < 3:
        raise ValueError(f"edge_aware_blur_pool2d needs H, W >= 3 (a 2-pixel reflection), got {tuple(input.shape)}")
    log = (F.pad(input, (2, 2, 2, 2), mode="reflect") + epsilon).log2()
    threshold = torch.tensor(float(edge_threshold), dtype=torch.float32).log2().to(log)  # kornia's, to the bit
    along_w = (log[..., 2:-2, 4:] - log[..., 2:-2, :-4]).mean(dim=-3, keepdim=True).abs() > threshold
    along_h = (log[..., 4:, 2:-2] - log[..., :-4, 2:-2]).mean(dim=-3, keepdim=True).abs() > threshold
    edges = F.max_pool2d((along_w | along_h).to(input.dtype), dilation, 1, dilation // 2)
    return edges * input + (1.0 - edges) * _blur_same_size(input, k)


class EdgeAwareBlurPool2D(nn.Module):
    """``kornia.filters.EdgeAwareBlurPool2D``: (B, C, H, W) -> (B, C, H, W); see :func:`edge_aware_blur_pool2d`."""

    def __init__(
        self, kernel_size: int | tuple[int, int], edge_threshold: float = 1.25, edge_dilation_kernel_size: int = 3
    ) -> None:
        super().__init__()
        _check_dilation(edge_dilation_kernel_size)
        self.kernel_size = kernel_size
        self.edge_threshold = edge_threshold
        self.edge_dilation_kernel_size = edge_dilation_kernel_size

    def forward(self, input: Tensor, epsilon: float | None = None) -> Tensor:
        epsilon = 1e-6 if epsilon is None else epsilon
        return edge_aware_blur_pool2d(
            input, self.kernel_size, self.edge_threshold, self.edge_dilation_kernel_size, epsilon
        )


_LAYERS: dict[tuple, BlurLayer] = {}


def _layer(cls: type, *args) -> BlurLayer:
    """Functional calls reuse one stateless layer per argument set (no buffers are read)."""
    key = (cls, *(tuple(a) if isinstance(a, list) else a for a in args))
    layer = _LAYERS.get(key)
    if layer is None:
        layer = _LAYERS[key] = cls(*args)
    return layer
