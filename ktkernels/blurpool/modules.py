"""Blur-pool modules and functional API (antialiased-cnns argument order and state-dict keys).

Example::

    >>> import torch, ktkernels
    >>> layer = ktkernels.BlurPool2d(64)                  # filt_size=4, stride=2, reflect
    >>> layer(torch.randn(8, 64, 56, 56)).shape
    torch.Size([8, 64, 28, 28])
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import List  # noqa: UP035 (TorchScript reads the annotations)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from . import op
from .geometry import MAX_FILT_SIZE, MAX_STRIDE, adobe_pads, binomial_filter2d, binomial_taps, canonical_pad_mode
from .reference import blur_pool_decomposed


def _blur_args(
    filt_size: int, stride: int, padding: int | Sequence[int] | None, sides: int
) -> tuple[int, int, list[int]]:
    """Validated (filt_size, stride, pads) as ints. Pads: None -> antialiased-cnns' ((k-1)//2, ceil((k-1)/2)) per
    axis; an int -> every side.

    Types are checked here, before the dispatcher, so bad values raise TypeError/ValueError naming them.
    """
    filt_size, stride, _ = op.check_blur_params(filt_size, stride, [])
    if padding is None:
        pads = list(adobe_pads(filt_size)) * (sides // 2)
    elif isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        pads = [padding] * sides
    elif isinstance(padding, Sequence) and not isinstance(padding, str):
        pads = list(padding)
        if len(pads) != sides:
            raise ValueError(f"padding must be an int or {sides} ints, got {pads}")
    else:
        raise TypeError(f"padding must be None, an int or {sides} ints, got {padding!r}")
    return op.check_blur_params(filt_size, stride, pads)


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
    ``pad_mode``: 'reflect' | 'replicate' | 'zero' (aliases 'refl', 'repl', 'constant'). An empty spatial
    axis is only valid with 'zero' padding, whose windows then hold zeros only: the output is zeros.

    >>> blur_pool2d(torch.randn(2, 3, 7, 9)).shape
    torch.Size([2, 3, 4, 5])
    """
    return op.blur(x, 2, *_blur_args(filt_size, stride, padding, 4), canonical_pad_mode(pad_mode))


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
    return op.blur(x, 1, *_blur_args(filt_size, stride, padding, 2), canonical_pad_mode(pad_mode))


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
    stem; ``max_kernel=3, max_padding=1`` the DenseNet one. As in max_pool2d, H and W must be at least
    ``max(max_kernel - 2 * max_padding, 1)`` (ValueError otherwise).

    >>> max_blur_pool2d(torch.randn(2, 3, 112, 112)).shape
    torch.Size([2, 3, 56, 56])
    """
    args = _blur_args(filt_size, stride, padding, 4)
    max_kernel, max_padding = op.check_max(max_kernel, max_padding)
    return op.max_blur(x, max_kernel, max_padding, *args, canonical_pad_mode(pad_mode))


# ----------------------------------------------------------------------------------------------
# The decomposed path: pad + grouped conv, for exporters and tracers that cannot see custom ops


class _DecomposeState(threading.local):
    active = False
    zero_pad = False


_DECOMPOSE = _DecomposeState()


@contextlib.contextmanager
def decomposed(zero_pad: bool = False) -> Iterator[None]:
    """Inside this block every ktkernels blur layer runs as ``F.pad`` + grouped ``F.conv2d``.

    That is what ONNX (and any exporter or runtime without the ktkernels ops) should see: ``Pad`` +
    ``Conv(group=C)``. ``zero_pad=True`` exports zero padding instead of reflect/replicate, for
    runtimes that lack them; this **changes the border values** and is the caller's choice.
    ``torch.jit.script`` and ``torch.fx.symbolic_trace`` take this path on their own.

    >>> layer = BlurPool2d(3)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> with decomposed():
    ...     y = layer(x)
    >>> torch.allclose(y, layer(x))
    True
    """
    previous = (_DECOMPOSE.active, _DECOMPOSE.zero_pad)
    _DECOMPOSE.active, _DECOMPOSE.zero_pad = True, bool(zero_pad)
    try:
        yield
    finally:
        _DECOMPOSE.active, _DECOMPOSE.zero_pad = previous


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, numbers.Integral) else list(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return pair


class FixedFilterState(nn.Module):
    """Base of the layers that keep an anchor's filter buffer in their state dict, which the kernels never read.

    Loading a checkpoint whose filter differs from the fixed binomial one would silently change the numbers, so
    ``load_state_dict`` reports it with its other errors (a ``RuntimeError`` naming the key), strict or not.
    """

    def _fixed_filters(self) -> dict[str, Tensor]:
        """Buffer name -> the filter its trailing dims must hold: (k,) or (k, k), broadcast over the leading dims."""
        return {}

    def _legacy_state_keys(self) -> tuple[str, ...]:
        """Keys an older version of the anchor saved and this layer drops on load (after the filter check)."""
        return ()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for name, filt in self._fixed_filters().items():
            loaded = state_dict.get(prefix + name)
            if (
                not isinstance(loaded, Tensor)
                or not loaded.is_floating_point()
                or loaded.is_meta
                or loaded.numel() == 0
                or loaded.shape[loaded.dim() - filt.dim() :] != filt.shape  # a size mismatch: nn.Module reports it
            ):
                continue
            expected = filt.to(torch.float64)
            error = (loaded.detach().to("cpu", torch.float64) - expected).abs().max().item()
            if not error <= 4 * torch.finfo(loaded.dtype).eps * expected.abs().max().item():  # NaN fails too
                k = "x".join(map(str, filt.shape))
                error_msgs.append(
                    f"{prefix}{name}: {type(self).__name__} always filters with the normalised binomial filter of "
                    f"size {k} and keeps '{name}' only for checkpoint compatibility; this checkpoint's '{name}' "
                    f"differs from it by up to {error:.3g}, so loading it would silently change the numbers. Load it "
                    f"into the original layer (or a depthwise conv) instead."
                )
                state_dict[prefix + name] = getattr(self, name)  # the buffer keeps the filter the kernels apply
        for name in self._legacy_state_keys():
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BlurLayer(FixedFilterState):
    """Base of every ktkernels blur layer (the compat flavours included).

    A subclass calls :meth:`_configure` with the op's parameters and registers whatever buffers its
    anchor keeps in the state dict. ``forward`` runs the fused custom op; TorchScript, FX tracing and
    the :func:`decomposed` context run the pad + grouped-conv decomposition of the same maths.

    A public ``stride`` attribute is live, as in every anchor, whose ``forward`` reads it: setting it (model
    surgery that sets ``stride = 1``) reconfigures the layer, with the same pads. The other constructor
    attributes are fixed at construction, like the anchors' filter buffers and pad modules.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "stride" and "_config" in self.__dict__:
            self._configure(**{**self._config, "stride": value})  # validates before anything changes
        super().__setattr__(name, value)

    def _configure(
        self,
        *,
        spatial_dims: int,
        filt_size: int,
        stride: int | Sequence[int],
        padding: Sequence[int],
        pad_mode: str,
        channels: int | None,
        max_kernel: int | Sequence[int] = 1,
        max_padding: int | Sequence[int] = 0,
        max_dilation: int | Sequence[int] = 1,
        decomposed_pad_modes: Sequence[str] = (),
    ) -> None:
        """Store the op's parameters. ``padding`` is in F.pad order (last axis first, before/after).
        ``decomposed_pad_modes``: F.pad modes the anchor accepts beyond the fused ones (timm's 'circular'),
        run by the decomposition.

        The fused ops cover filt_size 1..7, one stride 1..4 for both axes and the max-pool pairs
        (2, pad 0) / (3, pad 1). Anything else an anchor accepts (kornia's k > 7, a (2, 1) stride,
        kornia's max_pool_size=3 without padding) runs the decomposition, with the same values.
        """
        config = {k: v for k, v in locals().items() if k != "self"}
        if channels is not None:
            if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
                raise ValueError(f"channels must be a positive int or None, got {channels!r}")
            channels = int(channels)
        filt_size = op.check_int("filt_size", filt_size, 1)
        strides = [stride] * spatial_dims if isinstance(stride, numbers.Integral) else list(stride)
        if len(strides) != spatial_dims:
            raise ValueError(f"stride must be an int or {spatial_dims} ints, got {stride!r}")
        strides = [op.check_int("stride", s, 1) for s in strides]
        padding = list(padding)
        if len(padding) != 2 * spatial_dims:
            raise ValueError(f"expected {2 * spatial_dims} pads, got {padding}")
        padding = [op.check_int("each pad", p, 0) for p in padding]
        pool = [
            _pair(v, name)
            for v, name in ((max_kernel, "max_kernel"), (max_padding, "max_padding"), (max_dilation, "max_dilation"))
        ]
        for axis in range(2):
            pool[0][axis] = op.check_int("max_kernel", pool[0][axis], 1)
            pool[1][axis] = op.check_int("max_padding", pool[1][axis], 0, pool[0][axis] // 2)
            pool[2][axis] = op.check_int("max_dilation", pool[2][axis], 1)
        self._spatial_dims = spatial_dims
        self._filt_size = filt_size
        self._stride = strides[0]
        self._strides: List[int] = strides  # noqa: UP006
        self._padding: List[int] = padding  # noqa: UP006 (F.pad order: last axis first)
        decomposed_mode = isinstance(pad_mode, str) and pad_mode in decomposed_pad_modes
        self._pad_mode = pad_mode if decomposed_mode else canonical_pad_mode(pad_mode)
        self._expected_channels = channels or 0  # 0: any (TorchScript wants one attribute type)
        self._max_kernel_hw: List[int] = pool[0]  # noqa: UP006
        self._max_padding_hw: List[int] = pool[1]  # noqa: UP006
        self._max_dilation_hw: List[int] = pool[2]  # noqa: UP006
        self._has_max = pool[0] != [1, 1]
        self._max_kernel = pool[0][0] if self._has_max else 1
        self._max_padding = pool[1][0]
        self._taps: List[float] = binomial_taps(filt_size)  # noqa: UP006
        square = all(v[0] == v[1] for v in pool)
        self._fused_max = square and pool[2] == [1, 1] and (pool[0][0], pool[1][0]) in ((2, 0), (3, 1))
        self._has_fused_op = (
            filt_size <= MAX_FILT_SIZE
            and len(set(strides)) == 1
            and strides[0] <= MAX_STRIDE
            and (not self._has_max or self._fused_max)
            and not decomposed_mode
        )
        self._config = config  # what a new stride reconfigures from

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._decomposed(x, self._pad_mode)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._decomposed(x, self._pad_mode)
        if _DECOMPOSE.active or not self._has_fused_op:
            op.check_input(x, self._spatial_dims, type(self).__name__)
            self._check_channels(x)
            if _DECOMPOSE.active:
                return op.fixed_in_trace(self._decomposed, x, "zero" if _DECOMPOSE.zero_pad else self._pad_mode)
            # Parameters the fused ops do not cover run pad + conv, but a named backend must still be able to run
            # on x's device: the same RuntimeError as the fused path, never a silent fallback. (A compiled graph
            # holds the pad + conv itself.)
            if not torch.compiler.is_compiling():
                backend.resolve(op.FAMILY, x.device)
            return op.fixed_in_trace(self._decomposed, x, self._pad_mode)
        self._check_channels(x)
        return self._fused(x)

    def _decomposed(self, x: Tensor, pad_mode: str) -> Tensor:
        if self._has_max:
            x = F.max_pool2d(x, self._max_kernel_hw, 1, self._max_padding_hw, self._max_dilation_hw)
        return blur_pool_decomposed(x, self._taps, self._strides, self._padding, pad_mode, self._spatial_dims)

    @torch.jit.unused
    def _fused(self, x: Tensor) -> Tensor:
        args = (self._filt_size, self._stride, self._padding, self._pad_mode)
        if self._has_max:
            return op.max_blur(x, self._max_kernel, self._max_padding, *args)
        return op.blur(x, self._spatial_dims, *args)

    @torch.jit.unused
    def _check_channels(self, x: Tensor) -> None:
        # Only for inputs of the right rank: the op's rank error names a missing batch dim, a channel error would not.
        if not self._expected_channels or not isinstance(x, Tensor) or x.dim() != self._spatial_dims + 2:
            return
        if torch.jit.is_tracing():
            # torch.jit.trace records sizes as tensors and warns that this test is fixed in the trace: it is meant to be
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                mismatch = bool(x.shape[1] != self._expected_channels)
        else:
            mismatch = x.shape[1] != self._expected_channels
        if mismatch:
            raise ValueError(
                f"{type(self).__name__} was built for {self._expected_channels} channels, "
                f"got an input with {x.shape[1]}"
            )


class _AdobeLayer(BlurLayer):
    """antialiased-cnns constructor: its attributes and a persistent ``filt`` buffer."""

    spatial_dims = 2

    def __init__(
        self,
        channels: int | None,
        pad_type: str,
        filt_size: int,
        stride: int,
        pad_off: int,
        max_kernel: int = 1,
        max_padding: int = 0,
    ) -> None:
        super().__init__()
        filt_size = op.check_int("filt_size", filt_size, 1, MAX_FILT_SIZE)  # antialiased-cnns' table ends at 7
        stride = op.check_int("stride", stride, 1)  # any: strides above MAX_STRIDE run the pad + conv decomposition
        pad_off = op.check_int("pad_off", pad_off, -filt_size)
        pad_sizes = list(adobe_pads(filt_size, pad_off)) * self.spatial_dims
        if any(p < 0 for p in pad_sizes):
            raise ValueError(f"pad_off={pad_off} gives negative pads {pad_sizes} for filt_size={filt_size}")
        self._configure(
            spatial_dims=self.spatial_dims,
            filt_size=filt_size,
            stride=stride,
            padding=pad_sizes,
            pad_mode=pad_type,
            channels=channels,
            max_kernel=max_kernel,
            max_padding=max_padding,
        )
        self.channels = self._expected_channels or None
        self.filt_size = filt_size
        self.stride = stride
        self.pad_off = pad_off
        self.pad_type = self._pad_mode
        self.off = (stride - 1) // 2
        self.pad_sizes = pad_sizes
        # Persistent (C, 1, k, k) like antialiased-cnns, so its checkpoints load with strict=True.
        # The kernels use exact taps and never read it (a checkpoint with another filter fails to load).
        filt = self._fixed_filters()["filt"][None, None]
        self.register_buffer("filt", filt.repeat(self.channels or 1, *([1] * (filt.dim() - 1))))

    def _fixed_filters(self) -> dict[str, Tensor]:
        if self.spatial_dims == 2:
            return {"filt": binomial_filter2d(self.filt_size)}
        return {"filt": torch.tensor(binomial_taps(self.filt_size), dtype=torch.float32)}

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, pad_type={self.pad_type!r}, filt_size={self.filt_size}, "
            f"stride={self.stride}, pad_off={self.pad_off}"
        )


class BlurPool2d(_AdobeLayer):
    """Drop-in for ``antialiased_cnns.BlurPool``: (N, C, H, W) -> (N, C, ceil(H/stride), ceil(W/stride)).

    Args:
        channels: expected C, or None to take it from the input. A mismatch raises ``ValueError``.
        pad_type: 'reflect' (default) | 'replicate' | 'zero', or 'refl' / 'repl'.
        filt_size: binomial filter size, 1..7 (default 4).
        stride: >= 1 (default 2); 1..4 run fused, larger strides the pad + conv decomposition.
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


class BlurPool1d(_AdobeLayer):
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


class MaxBlurPool2d(_AdobeLayer):
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
        max_kernel, max_padding = op.check_max(max_kernel, max_padding)
        super().__init__(channels, pad_type, filt_size, stride, pad_off, max_kernel, max_padding)
        self.max_kernel = max_kernel
        self.max_padding = max_padding

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_kernel={self.max_kernel}, max_padding={self.max_padding}"


class MaxThenBlur(nn.Sequential):
    """``Sequential(MaxPool2d(k, stride=1, padding=p), blur)`` that runs as one fused max-blur kernel.

    The antialiased-cnns layout (``maxpool = Sequential(MaxPool2d(2, 1), BlurPool(64))``) with the same
    state-dict keys (``maxpool.1.filt``). Falls back to running the two children when the pair is not
    one the fused op covers (max kernel 2 pad 0 or 3 pad 1, dilation 1, no ceil effect).
    """

    def __init__(self, max_pool: nn.MaxPool2d, blur: BlurLayer) -> None:
        super().__init__(max_pool, blur)

    def _fusable(self) -> bool:
        pool, blur = self[0], self[1]
        if not isinstance(pool, nn.MaxPool2d) or not isinstance(blur, BlurLayer) or blur._spatial_dims != 2:
            return False
        kernel, stride, padding, dilation = (
            (v, v) if isinstance(v, int) else tuple(v)
            for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        )
        square = kernel[0] == kernel[1] and padding[0] == padding[1]
        fused_pair = (kernel[0], padding[0]) in ((2, 0), (3, 1))
        return (
            square
            and fused_pair
            and stride == (1, 1)
            and dilation == (1, 1)
            and not pool.return_indices
            and not blur._has_max
            and blur._has_fused_op
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            for module in self:
                x = module(x)
            return x
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy) or _DECOMPOSE.active or not self._fusable():
            for module in self:
                x = module(x)
            return x
        pool, blur = self[0], self[1]
        blur._check_channels(x)
        kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        padding = pool.padding if isinstance(pool.padding, int) else pool.padding[0]
        args = (blur._filt_size, blur._stride, blur._padding, blur._pad_mode)
        return op.max_blur(x, kernel, padding, *args)
