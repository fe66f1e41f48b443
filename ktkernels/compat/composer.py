"""Composer drop-in (``composer.algorithms.blurpool``): layers, functionals and ``apply_blurpool`` surgery.

The 3x3 ``[1,2,1]^2/16`` filter with zero pad 1, so ``H_out = ceil(H/stride)``: the same values as
antialiased-cnns ``BlurPool(pad_type='zero', filt_size=3)``. Buffers keep Composer's names and
persistence (``blur_filter``, ``filt2d``) and ``conv._already_blurpooled`` marks converted convs.

Improvements that change no value Composer computes correctly:

- ``BlurMaxPool2d`` honours ``ceil_mode``: its output has the replaced ``MaxPool2d``'s size (Composer's is
  one row/column short there); the extra row blurs the zero-padded max map.
- ``BlurConv2d(blur_first=True)`` on a strided 1x1 conv runs the exact rewrite: blur-pool at the stride, then
  the conv at stride 1 (s^2 less blur output and conv input).
- ``from_conv2d`` keeps the conv's dtype, device and ``padding_mode``; channels are static (FX, ONNX).
- ``apply_blurpool`` reuses the original ``Parameter`` objects, so optimizers need no rebuilding.

>>> import torch
>>> BlurPool2d(8)(torch.randn(1, 8, 7, 7)).shape
torch.Size([1, 8, 4, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List  # noqa: UP035 (TorchScript reads the annotations)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blurpool import op
from ..blurpool.geometry import binomial_filter2d
from ..blurpool.modules import BlurLayer, FixedFilterState
from ..checks import int_pair

__all__ = ["BlurConv2d", "BlurMaxPool2d", "BlurPool2d", "apply_blurpool", "blur_2d", "blurmax_pool2d"]


def _filter3x3(channels: int = 1) -> Tensor:
    return binomial_filter2d(3)[None, None].repeat(channels, 1, 1, 1)


class _BlurFilterBuffer(FixedFilterState):
    """Composer's and FFCV's persistent ``blur_filter`` (C, 1, 3, 3): kept for their checkpoints, never read."""

    def _fixed_filters(self) -> dict[str, Tensor]:
        return {"blur_filter": binomial_filter2d(3)}


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints (numpy's too) as a pair, as ``nn.Conv2d`` and ``nn.MaxPool2d`` take them."""
    pair = int_pair(value)
    if pair is None:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


class _LiveAttributes(FixedFilterState):
    """Composer's forwards read their constructor attributes on every call, so setting one (model surgery that
    sets ``stride = 1``) takes effect: here it rebuilds the blur children (``_build``), with the same checks."""

    _LIVE = ()  # names of the live attributes (no annotation: TorchScript would look for an instance attribute)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in self._LIVE and self.__dict__.get("_built", False):
            self._build()

    def _build(self) -> None:
        raise NotImplementedError


class _Blur3x3(BlurLayer):
    """The bare 3x3 zero-padded blur at a stride, with ``extra`` zero rows/cols after (ceil_mode); no buffers."""

    def __init__(
        self,
        stride: int | Sequence[int],
        channels: int | None = None,
        extra: Sequence[int] = (0, 0),
        max_kernel: int | Sequence[int] = 1,
        max_padding: int | Sequence[int] = 0,
        max_dilation: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        sh, sw = _pair(stride, "stride")
        self._configure(
            spatial_dims=2,
            filt_size=3,
            stride=[sh, sw],
            padding=[1, 1 + extra[1], 1, 1 + extra[0]],
            pad_mode="zero",
            channels=channels,
            max_kernel=max_kernel,
            max_padding=max_padding,
            max_dilation=max_dilation,
        )


class BlurPool2d(_BlurFilterBuffer, _LiveAttributes):
    """``composer...BlurPool2d(channels=0, stride=2, padding=1)``: (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)).

    ``channels`` 0 or -1 reads C from the input; ``padding`` is stored and, as in Composer, ignored. ``stride``
    and ``channels`` are live, as in Composer.
    """

    _LIVE = ("channels", "stride")

    def __init__(self, channels: int = 0, stride: int | Sequence[int] = 2, padding: int | Sequence[int] = 1) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride
        self.padding = padding
        self.register_buffer("blur_filter", _filter3x3(max(channels, 1)))
        self._build()
        self._built = True

    def _build(self) -> None:
        self.blur = _Blur3x3(self.stride, self.channels if self.channels > 0 else None)

    def forward(self, input: Tensor) -> Tensor:
        return self.blur(input)


class BlurMaxPool2d(_LiveAttributes):
    """``composer...BlurMaxPool2d``: ``max_pool2d(kernel_size, stride=1, padding, dilation)`` then the 3x3 blur.

    (N, C, H, W) -> the size ``nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode)`` gives.
    Fused into one kernel for (kernel 2, pad 0) and (kernel 3, pad 1) with dilation 1. The constructor attributes
    are live, as in Composer.
    """

    _LIVE = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        for k in _pair(kernel_size, "kernel_size"):
            op.check_int("kernel_size", k, 1)  # before the stride, which defaults to it
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.register_buffer("filt2d", _filter3x3())
        self._build()
        self._built = True

    def _build(self) -> None:
        stride_hw = _pair(self.stride, "stride")
        # ceil_mode: s - 1 extra zero rows give ceil((H_m - 1)/s) + 1 rows; forward crops to torch's rule.
        extra = tuple(s - 1 for s in stride_hw) if self.ceil_mode else (0, 0)
        self.blur = _Blur3x3(stride_hw, None, extra, self.kernel_size, self.padding, self.dilation)
        self._stride_hw: List[int] = list(stride_hw)  # noqa: UP006 (TorchScript)
        self._padding_hw: List[int] = list(_pair(self.padding, "padding"))  # noqa: UP006

    def _fixed_filters(self) -> dict[str, Tensor]:
        return {"filt2d": binomial_filter2d(3)}

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )

    def forward(self, input: Tensor) -> Tensor:
        out = self.blur(input)
        if self.ceil_mode:
            out = _ceil_crop(out, input, self._stride_hw, self._padding_hw)
        return out

    @staticmethod
    def from_maxpool2d(module: nn.MaxPool2d, module_index: int = -1) -> BlurMaxPool2d:
        """The replacement for ``module`` (its kernel, stride, padding, dilation and ceil_mode)."""
        return BlurMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)


def _ceil_crop(out: Tensor, input: Tensor, stride_hw: List[int], padding_hw: List[int]) -> Tensor:  # noqa: UP006
    """``out`` cropped to ``nn.MaxPool2d(ceil_mode=True)``'s size for ``input``: torch drops a last window that would
    start past the input and its padding. Slicing never grows a tensor, so this is min(size, limit) without control
    flow (FX traces it)."""
    sh, sw = stride_hw
    ph, pw = padding_hw
    return out[:, :, : (input.shape[2] + ph + sh - 1) // sh, : (input.shape[3] + pw + sw - 1) // sw]


def _is_exact_pool_rewrite(conv: nn.Conv2d) -> bool:
    """A 1x1, unpadded, strided conv commutes with the blur: blur-pool at the stride, then conv at stride 1."""
    return conv.kernel_size == (1, 1) and conv.padding in ((0, 0), "valid") and max(conv.stride) > 1


class BlurThenConv(_BlurFilterBuffer, _LiveAttributes):
    """Shared by Composer's ``BlurConv2d(blur_first=True)`` and FFCV's ``BlurPoolConv2d``: ``conv(blur_s1(x))``.

    For a strided 1x1 conv it computes ``conv_s1(blurpool_s(x))`` instead: the same values (the blur
    commutes with a 1x1 conv), with s^2 less blur output and conv input. Whether the rewrite applies is checked
    on every call, so a conv swapped in (``layer.conv = ...``, a LoRA-style wrapper) or changed in place runs as
    the anchor runs it.
    """

    def _setup_blur_then_conv(self, conv: nn.Module) -> None:
        # Only a plain nn.Conv2d: a subclass's or a wrapper's own forward (weight standardisation, QAT) must run.
        self._pool_rewrite = type(conv) is nn.Conv2d and _is_exact_pool_rewrite(conv)
        stride = tuple(conv.stride) if self._pool_rewrite else (1, 1)
        self._pool_stride: List[int] = list(stride)  # noqa: UP006 (TorchScript)
        self.pool_blur = _Blur3x3(stride, conv.in_channels if self._pool_rewrite else None)  # stateless: no keys

    def _blur_then_conv(self, input: Tensor) -> Tensor:
        """Needs ``self.conv`` and ``self.blur`` (the stride-1 blur)."""
        shortcut = self._pool_rewrite
        if not torch.jit.is_scripting():  # TorchScript skips this block (and scripted modules run no Python hooks)
            shortcut = shortcut and self._rewrite_still_applies()
        if shortcut:
            return F.conv2d(self.pool_blur(input), self.conv.weight, self.conv.bias, 1, 0, 1, self.conv.groups)
        return self.conv(self.blur(input))

    @torch.jit.unused
    def _rewrite_still_applies(self) -> bool:
        """The conv is still the plain strided 1x1 conv ``pool_blur`` was built for, and has no hooks (weight_norm's
        pre-hook, pruning, user hooks need its own forward call)."""
        conv = self.conv
        return (
            type(conv) is nn.Conv2d
            and _is_exact_pool_rewrite(conv)
            and list(conv.stride) == self._pool_stride
            and not (conv._forward_hooks or conv._forward_pre_hooks or conv._forward_hooks_with_kwargs)
        )


class BlurConv2d(BlurThenConv):
    """``composer...BlurConv2d``: a 3x3 blur on the input at stride 1, then the strided conv (``blur_first``),
    or the conv at stride 1, then the blur at the stride. (N, C_in, H, W) -> what the plain conv gives.
    """

    _LIVE = ("conv", "blur_first", "blur_stride", "blur_nchannels")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        blur_first: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if blur_first and stride is None:
            raise ValueError("BlurConv2d(blur_first=True) needs an explicit stride")
        self.blur_first = blur_first
        if blur_first:
            conv_stride, self.blur_stride, self.blur_nchannels = stride, 1, in_channels
        else:
            conv_stride, self.blur_nchannels = 1, out_channels
            self.blur_stride = kernel_size if stride is None else stride
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            conv_stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.conv._already_blurpooled = True
        self.register_buffer("blur_filter", _filter3x3(self.blur_nchannels).to(device=device))
        self._build()
        self._built = True

    def _build(self) -> None:
        """The blur (at stride 1 before the conv, or at ``blur_stride`` after it) and the 1x1 rewrite for ``conv``."""
        self.blur = _Blur3x3(1 if self.blur_first else self.blur_stride, self.blur_nchannels)
        self._setup_blur_then_conv(self.conv)
        self._pool_rewrite = self._pool_rewrite and self.blur_first

    def forward(self, input: Tensor) -> Tensor:
        if not self.blur_first:
            return self.blur(self.conv(input))
        return self._blur_then_conv(input)

    def adopt_conv(self, conv: nn.Conv2d) -> None:
        """Wrap ``conv`` itself (its Parameters, subclass and hooks) instead of the conv built here."""
        conv._already_blurpooled = True  # apply_blurpool passes it by
        self.conv = conv  # live: rebuilds the rewrite for it

    @staticmethod
    def from_conv2d(module: nn.Conv2d, module_index: int = -1, blur_first: bool = True) -> BlurConv2d:
        """The replacement for ``module``, with its weights copied (dtype, device, padding_mode kept)."""
        conv = BlurConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            blur_first,
            module.padding_mode,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        with torch.no_grad():
            conv.conv.weight.copy_(module.weight)
            if module.bias is not None:
                conv.conv.bias.copy_(module.bias)
        return conv


def blur_2d(input: Tensor, channels: int = -1, stride: int | Sequence[int] = 1, filter: Tensor | None = None) -> Tensor:
    """``composer...blur_2d``: depthwise blur with zero 'same' padding at ``stride``; (N, C, H, W) in.

    The default 3x3 binomial filter runs fused; a custom (odd-sized) ``filter`` runs as ``F.conv2d``.
    """
    if filter is not None:
        _, _, fh, fw = filter.shape
        if fh % 2 == 0 or fw % 2 == 0:
            raise IndexError(f"Filter must have odd height and width; got {fh}x{fw}")
        c = input.shape[1] if channels < 1 else channels
        if filter.shape[0] == 1 and c > 1:
            filter = filter.expand(c, 1, fh, fw)
        return F.conv2d(input, filter.to(input), None, _pair(stride, "stride"), (fh // 2, fw // 2), 1, c)
    return _Blur3x3(stride, channels if channels > 0 else None)(input)


def blurmax_pool2d(
    input: Tensor,
    kernel_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] = 2,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    filter: Tensor | None = None,
) -> Tensor:
    """``composer...blurmax_pool2d``: max pool at stride 1, then the blur at ``stride`` (ceil_mode honoured)."""
    kernel_size = (2, 2) if kernel_size is None else kernel_size
    if filter is not None:
        maxs = F.max_pool2d(input, kernel_size, 1, padding, dilation)
        if not ceil_mode:
            return blur_2d(maxs, -1, stride, filter)
        # as BlurMaxPool2d does: s - 1 extra zero rows and columns, then torch's ceil_mode size
        stride_hw = _pair(stride, "stride")
        maxs = F.pad(maxs, (0, stride_hw[1] - 1, 0, stride_hw[0] - 1))
        return _ceil_crop(blur_2d(maxs, -1, stride_hw, filter), input, list(stride_hw), list(_pair(padding, "padding")))
    return BlurMaxPool2d(kernel_size, stride, padding, dilation, ceil_mode)(input)


def apply_blurpool(
    model: nn.Module,
    replace_convs: bool = True,
    replace_maxpools: bool = True,
    blur_first: bool = True,
    min_channels: int = 16,
    optimizers=None,
) -> nn.Module:
    """Composer's surgery, in place: strided ``nn.Conv2d`` (subclasses too) with ``in_channels >= min_channels``
    become :class:`BlurConv2d`; every ``nn.MaxPool2d`` becomes :class:`BlurMaxPool2d`. Idempotent.

    Each :class:`BlurConv2d` wraps the original conv itself, so ``optimizers`` (accepted for Composer's signature)
    need no rebuilding, and a conv subclass keeps its own forward (e.g. timm's weight-standardised ``StdConv2d``),
    parametrizations and hooks; Composer copies the weights into a plain ``nn.Conv2d`` instead, which changes such
    a model's numbers. With ``blur_first=False`` the conv is set to stride 1, as Composer builds its conv.
    Returns ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = None
            if (
                replace_convs
                and isinstance(child, nn.Conv2d)
                and max(child.stride) > 1
                and child.in_channels >= min_channels
                and not getattr(child, "_already_blurpooled", False)
            ):
                replacement = BlurConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, blur_first, child.padding_mode,
                    device=_device_of(child, model),
                )  # fmt: skip
                if not blur_first:
                    child.stride = (1, 1)  # the blur after it takes the stride
                replacement.adopt_conv(child)
            elif replace_maxpools and isinstance(child, nn.MaxPool2d):
                replacement = BlurMaxPool2d.from_maxpool2d(child).to(_device_of(child, model))
            if replacement is not None:
                setattr(parent, name, replacement)
    return model


def _device_of(module: nn.Module, model: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers(), *model.parameters()):
        return tensor.device
    return torch.device("cpu")
