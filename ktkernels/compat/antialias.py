"""``antialias(model)``: make a pre-trained, plain CNN anti-aliased (Zhang, ICML 2019), keeping its weights.

Only strides move: every strided conv (or pool) that downsamples runs at stride 1 and a
:class:`~ktkernels.BlurPool2d` at the old stride follows it, after the norm and non-linearity where the
architecture has them (the paper's ``Conv -> BN -> ReLU -> BlurPool``). No parameter is created, dropped or
re-initialised; the very ``Parameter`` objects stay in the model, so optimizers built before the call keep
working. The convs keep their output sizes (``ceil(H/s)`` both ways). A max-pool stem becomes
``MaxPool2d(2, 1)`` + BlurPool, as in antialiased-cnns: ``floor(H/2)`` where the plain pool gives ``ceil(H/2)``,
so an odd stem map (a 225x225 input to a ResNet) comes out one smaller, and every later stage with it.

Architectures are recognised by module and class name, so torchvision and timm are never imported here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..blurpool import BlurPool2d, MaxThenBlur

__all__ = ["SUPPORTED", "antialias"]


def antialias(
    model: nn.Module,
    placement: str = "adobe",
    filt_size: int = 4,
    pad_type: str = "reflect",
    min_channels: int = 16,
) -> nn.Module:
    """Anti-alias ``model`` in place and return it: (N, 3, H, W) -> same output shape as before.

    Args:
        model: a supported network (see :data:`SUPPORTED`; subclasses count), pretrained or not.
        placement: ``'adobe'``: the antialiased-cnns layouts below. ``'composer'``: MosaicML Composer's
            architecture-agnostic surgery, delegated to :func:`ktkernels.compat.composer.apply_blurpool`
            (``replace_convs=True, replace_maxpools=True, blur_first=True``); it works on any model and uses
            Composer's fixed 3x3 zero-padded blur, so ``filt_size`` and ``pad_type`` do not apply.
        filt_size: binomial blur size 1..7 (adobe placement).
        pad_type: 'reflect' | 'replicate' | 'zero' (adobe placement).
        min_channels: a conv or pool whose input has fewer channels is left alone (the RGB stem conv with the
            default 16; pass 3 to blur it too, which is antialiased-cnns' ``pool_only=False``).

    Adobe placement, per family:

    * torchvision ResNet / ResNeXt / Wide-ResNet (and :class:`ktkernels.models.ResNet`): the state dict then
      has exactly the keys and shapes of ``antialiased_cnns.resnet*`` and :mod:`ktkernels.models`, so their
      checkpoints load with ``strict=True``. Stem ``maxpool`` -> ``MaxThenBlur(MaxPool2d(2, 1), BlurPool)``;
      strided BasicBlock: conv1 at stride 1, ``conv2 = [BlurPool, conv2]``; strided Bottleneck: conv2 at
      stride 1, ``conv3 = [BlurPool, conv3]``; shortcut ``[BlurPool, conv1x1 (s1), BN]``.
    * VGG (with or without BN): each ``MaxPool2d(2, 2)`` -> ``MaxPool2d(2, 1), BlurPool`` in the flat
      ``features`` list (antialiased-cnns' indices).
    * DenseNet: stem ``pool0`` -> ``max0 = MaxPool2d(3, 1, 1)``, ``pool0 = BlurPool`` (and, when conv0 is
      blurred, ``ds0 = BlurPool`` after ``relu0``); each transition's ``AvgPool2d(2, 2)`` -> ``BlurPool``
      (antialiased-cnns' keys; odd sizes round up instead of down).
    * MobileNetV2: the stride-2 depthwise conv at stride 1, then its BN and ReLU6, then ``BlurPool`` as the
      next entry of the block's ``conv`` list (antialiased-cnns' keys for ``features``; torchvision's
      ``classifier = [Dropout, Linear]`` stays, where antialiased-cnns has ``[Linear]``).
    * MobileNetV3: the stride-2 depthwise conv at stride 1 and ``BlurPool`` appended to its ``ConvNormAct``
      (after the activation, before SE and the projection), so every torchvision key stays as it was. A
      blurred MobileNet stem (``min_channels <= 3``) gets its blur appended the same way.
    * timm ResNet family: the strided 3x3 conv at stride 1 with ``BlurPool`` in the block's ``aa`` slot and
      the stem max pool -> ``MaxThenBlur(MaxPool2d(3, 1, 1), BlurPool)``, as timm's ``aa_layer`` does; unlike
      timm's ``resnetblur``, a strided 1x1 shortcut is blurred too, ``[BlurPool, conv1x1 (s1), norm]`` as in
      antialiased-cnns (so ``downsample.*`` keys move up by one; every other timm key stays).

    Parts that are already anti-aliased (a ktkernels blur layer in place, or no stride left) are skipped, so a
    second call changes nothing. The new blur layers sit on the device and dtype of the weights next to them.
    ``[n for n, m in model.named_modules() if isinstance(m, ktkernels.blurpool.BlurLayer)]`` lists them.

    >>> import torch
    >>> from ktkernels.models import resnet18
    >>> model = antialias(resnet18())                    # already anti-aliased: nothing to do
    >>> sum(isinstance(m, BlurPool2d) for m in model.modules())
    7

    Raises:
        TypeError: ``model`` is not a supported architecture (adobe placement).
        ValueError: unknown ``placement``, or a ``filt_size`` / ``pad_type`` BlurPool2d refuses.
        NotImplementedError: a conv or pool the surgery may move has a non-square stride (before any change).
    """
    if placement == "composer":
        from .composer import apply_blurpool  # lazy: the adobe path does not need Composer's layers

        apply_blurpool(model, replace_convs=True, replace_maxpools=True, blur_first=True, min_channels=min_channels)
        return model
    if placement != "adobe":
        raise ValueError(f"placement must be 'adobe' or 'composer', got {placement!r}")
    # Validate the blur parameters and every stride the surgery may move before any surgery, so that a bad value
    # cannot leave a half-converted model.
    BlurPool2d(None, pad_type=pad_type, filt_size=filt_size)
    handler = _handler_for(model)
    for module in model.modules():
        movable_conv = isinstance(module, nn.Conv2d) and module.in_channels >= min_channels
        if movable_conv or isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            _square("stride", module.stride, module)
    handler(model, _Surgeon(filt_size, pad_type, min_channels, model.training))
    return model


@dataclass(frozen=True)
class _Surgeon:
    """The shared moves: take the stride out of a conv, and make new layers that match their neighbours."""

    filt_size: int
    pad_type: str
    min_channels: int
    training: bool

    def unstride(self, conv: nn.Module) -> int | None:
        """Set a strided ``nn.Conv2d`` to stride 1 and return its old stride; None when it is left alone.

        Safe for any kernel and padding: ``floor((H + 2p - k) / s) + 1 == ceil((H + 2p - k + 1) / s)``, the
        size the blur makes of the stride-1 output.
        """
        if not isinstance(conv, nn.Conv2d) or conv.stride == (1, 1) or conv.in_channels < self.min_channels:
            return None
        stride = _square("stride", conv.stride, conv)
        conv.stride = (1, 1)
        return stride

    def blur(self, channels: int, stride: int, like: nn.Module) -> BlurPool2d:
        """(N, channels, H, W) -> (N, channels, ceil(H/stride), ceil(W/stride)), placed like ``like``."""
        return self.place(BlurPool2d(channels, pad_type=self.pad_type, filt_size=self.filt_size, stride=stride), like)

    def blur_conv_norm_act(self, seq: nn.Sequential) -> None:
        """``[conv (s), norm, act]`` -> ``[conv (s1), norm, act, BlurPool (s)]``: appended, so no key moves."""
        stride = self.unstride(seq[0])
        if stride:
            seq.append(self.blur(seq[0].out_channels, stride, seq[0]))

    def max_then_blur(
        self,
        pool: nn.Module,
        channels: int,
        kernel: int | tuple[int, int],
        padding: int | tuple[int, int],
        like: nn.Module,
    ) -> MaxThenBlur:
        """A strided max pool -> ``MaxPool2d(kernel, 1, padding)`` then a blur at its stride (one fused kernel)."""
        stride = _square("stride", pool.stride, pool)
        return self.place(
            MaxThenBlur(nn.MaxPool2d(kernel, stride=1, padding=padding), self.blur(channels, stride, like)), like
        )

    def wrap(self, *modules: nn.Module | OrderedDict[str, nn.Module]) -> nn.Sequential:
        """A new ``nn.Sequential`` container, in the model's train/eval mode. Only the container's own flag is
        set: ``.train()`` would also reset the modules it holds (a frozen BatchNorm would train again)."""
        container = nn.Sequential(*modules)
        container.training = self.training
        return container

    def place(self, module: nn.Module, like: nn.Module) -> nn.Module:
        """``module`` on the device (and floating dtype) of ``like``'s first tensor, in the model's mode."""
        for tensor in (*like.parameters(), *like.buffers()):
            module.to(device=tensor.device, dtype=tensor.dtype if tensor.is_floating_point() else None)
            break
        return module.train(self.training)

    def wants(self, pool: nn.Module, kind: type[nn.Module], channels: int) -> bool:
        """Is ``pool`` a ``kind`` pool that downsamples an input of ``channels`` we blur?"""
        return isinstance(pool, kind) and _square("stride", pool.stride, pool) > 1 and channels >= self.min_channels


def _square(what: str, value: int | tuple[int, ...], module: nn.Module) -> int:
    """The one value of an int or square tuple ``value``; BlurPool2d has a single stride."""
    values = (value,) if isinstance(value, int) else tuple(value)
    if len(set(values)) != 1:
        raise NotImplementedError(f"antialias() handles square {what}s only, got {value} in {module}")
    return values[0]


def _is_conv_norm_act(module: nn.Module) -> bool:
    """torchvision's ``Conv2dNormActivation`` and its look-alikes: a Sequential that opens with a conv."""
    return isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(module[0], nn.Conv2d)


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


# ------------------------------------------------------------------------------------------------
# One function per family. Each finds the strided parts by their place in the architecture and skips
# those already done (stride 1, or a blur already there), which is what makes a second call a no-op.


def _resnet(model: nn.Module, s: _Surgeon) -> None:
    """torchvision and ktkernels ResNet / ResNeXt / Wide-ResNet, in antialiased-cnns' layout."""
    conv1 = model.conv1
    channels = conv1.out_channels
    stem_stride = s.unstride(conv1)
    pool = model.maxpool
    if s.wants(pool, nn.MaxPool2d, channels):
        pool = s.max_then_blur(pool, channels, kernel=2, padding=0, like=conv1)
    if stem_stride:
        # pool_only=False: conv1 (s1) -> bn1 -> relu -> [BlurPool, MaxPool2d(2, 1), BlurPool].
        head = s.blur(channels, stem_stride, conv1)
        pool = s.wrap(head, *pool) if isinstance(pool, MaxThenBlur) else s.wrap(head, pool)
    model.maxpool = pool
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            if hasattr(block, "conv3"):  # Bottleneck: the stride sits on the 3x3 conv2 (ResNet v1.5)
                stride = s.unstride(block.conv2)
                if stride:
                    block.conv3 = s.wrap(s.blur(block.conv2.out_channels, stride, block.conv2), block.conv3)
            else:
                stride = s.unstride(block.conv1)
                if stride:
                    block.conv2 = s.wrap(s.blur(block.conv1.out_channels, stride, block.conv1), block.conv2)
            _blur_shortcut(block, s)


def _blur_shortcut(block: nn.Module, s: _Surgeon) -> None:
    """Strided ``downsample = [conv1x1 (s), norm]`` -> ``[BlurPool (s), conv1x1 (s1), norm]``.

    A 1x1 conv commutes with the blur, and blurring its (narrower) input is the cheaper order.
    """
    shortcut = block.downsample
    if isinstance(shortcut, nn.Sequential) and len(shortcut) > 0:
        stride = s.unstride(shortcut[0])
        if stride:
            block.downsample = s.wrap(s.blur(shortcut[0].in_channels, stride, shortcut[0]), *shortcut)


def _vgg(model: nn.Module, s: _Surgeon) -> None:
    """torchvision VGG: ``MaxPool2d(2, 2)`` -> ``MaxPool2d(2, 1), BlurPool`` in the flat features list."""
    items: list[nn.Module] = []
    channels, last_conv = 0, None
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            channels, last_conv = module.out_channels, module
        if last_conv is not None and s.wants(module, nn.MaxPool2d, channels):
            stride = _square("stride", module.stride, module)
            items.append(s.place(nn.MaxPool2d(module.kernel_size, 1, module.padding, module.dilation), last_conv))
            items.append(s.blur(channels, stride, last_conv))
        else:
            items.append(module)
    if len(items) != len(model.features):
        model.features = s.wrap(*items)


def _densenet(model: nn.Module, s: _Surgeon) -> None:
    """torchvision DenseNet: stem ``max0, pool0`` as antialiased-cnns; transitions' AvgPool2d -> BlurPool."""
    features = model.features
    conv0 = features.conv0
    channels = conv0.out_channels
    stem_stride = s.unstride(conv0)
    items: list[tuple[str, nn.Module]] = []
    for name, module in features.named_children():
        if name == "pool0" and s.wants(module, nn.MaxPool2d, channels):
            stride = _square("stride", module.stride, module)
            items.append(("max0", s.place(nn.MaxPool2d(module.kernel_size, 1, module.padding), conv0)))
            items.append(("pool0", s.blur(channels, stride, conv0)))
            continue
        items.append((name, module))
        if name == "relu0" and stem_stride:
            items.append(("ds0", s.blur(channels, stem_stride, conv0)))  # pool_only=False's name
        conv = getattr(module, "conv", None)
        if isinstance(conv, nn.Conv2d) and s.wants(getattr(module, "pool", None), nn.AvgPool2d, conv.out_channels):
            # The blur replaces the 2x2 average (itself a box blur) at the same stride.
            module.pool = s.blur(conv.out_channels, _square("stride", module.pool.stride, module.pool), conv)
    if [name for name, _ in items] != [name for name, _ in features.named_children()]:
        model.features = s.wrap(OrderedDict(items))


def _mobilenet_v2(model: nn.Module, s: _Surgeon) -> None:
    """torchvision MobileNetV2: dw conv (s1) -> BN -> ReLU6 -> BlurPool -> projection, as antialiased-cnns."""
    for module in model.features:
        if _is_conv_norm_act(module):
            s.blur_conv_norm_act(module)
        elif isinstance(getattr(module, "conv", None), nn.Sequential):
            layers = list(module.conv)
            for i, layer in enumerate(layers):
                stride = s.unstride(layer[0]) if _is_conv_norm_act(layer) else None
                if stride:
                    layers.insert(i + 1, s.blur(layer[0].out_channels, stride, layer[0]))
                    module.conv = s.wrap(*layers)
                    break


def _mobilenet_v3(model: nn.Module, s: _Surgeon) -> None:
    """torchvision MobileNetV3: the blur closes the strided depthwise ConvNormAct (after its activation)."""
    for module in model.features:
        if _is_conv_norm_act(module):
            s.blur_conv_norm_act(module)
        elif isinstance(getattr(module, "block", None), nn.Sequential):
            for layer in module.block:
                if _is_conv_norm_act(layer):
                    s.blur_conv_norm_act(layer)


def _timm_resnet(model: nn.Module, s: _Surgeon) -> None:
    """timm ResNet family: the block's ``aa`` slot and the stem pool as timm's ``aa_layer`` builds them, plus the
    antialiased-cnns shortcut blur, which timm leaves out. Without it the aliased 1x1 shortcut undoes most of the
    gain: on a random-init resnet18, 1-3 px shifts move the pooled features by 0.33 (plain), 0.24 (timm's
    layout) and 0.03 (with the shortcut blurred)."""
    stem = model.conv1
    first = stem if isinstance(stem, nn.Conv2d) else stem[0]
    channels = next(m for m in reversed(list(stem.modules())) if isinstance(m, nn.Conv2d)).out_channels
    # Deep stems ([conv, norm, act, conv, norm, act, conv]): the blur goes after the first activation.
    act = None if isinstance(stem, nn.Conv2d) else next((i for i, m in enumerate(stem) if i and _stateless(m)), None)
    if act is None and not isinstance(stem, nn.Conv2d):
        raise NotImplementedError(f"antialias() expects an activation after the first stem conv in {stem}")
    stride = s.unstride(first)
    if stride:
        # Wrapping the (stateless) activation in [act, BlurPool] keeps every key where it was.
        if act is None:
            model.act1 = s.wrap(model.act1, s.blur(channels, stride, first))
        else:
            stem[act] = s.wrap(stem[act], s.blur(first.out_channels, stride, first))
    pool = model.maxpool
    if s.wants(pool, nn.MaxPool2d, channels):
        model.maxpool = s.max_then_blur(pool, channels, pool.kernel_size, pool.padding, like=first)
    elif _is_conv_norm_act(pool):  # replace_stem_pool: [conv (s2), norm, act]
        s.blur_conv_norm_act(pool)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            conv = block.conv2 if hasattr(block, "conv3") else block.conv1
            stride = s.unstride(conv)
            if stride:
                block.aa = s.blur(conv.out_channels, stride, conv)
            _blur_shortcut(block, s)


_Handler = Callable[[nn.Module, _Surgeon], None]

# (module, class qualname) -> handler; the model's MRO is searched, so subclasses are covered.
_HANDLERS: dict[tuple[str, str], _Handler] = {
    ("torchvision.models.resnet", "ResNet"): _resnet,
    ("ktkernels.models.resnet", "ResNet"): _resnet,
    ("torchvision.models.vgg", "VGG"): _vgg,
    ("torchvision.models.densenet", "DenseNet"): _densenet,
    ("torchvision.models.mobilenetv2", "MobileNetV2"): _mobilenet_v2,
    ("torchvision.models.mobilenetv3", "MobileNetV3"): _mobilenet_v3,
    ("timm.models.resnet", "ResNet"): _timm_resnet,
}

#: What ``antialias(placement='adobe')`` knows, for error messages and docs.
SUPPORTED: tuple[str, ...] = (
    "torchvision ResNet (resnet18/34/50/101/152, resnext*, wide_resnet*)",
    "torchvision VGG (vgg11..vgg19, with or without _bn)",
    "torchvision DenseNet (densenet121/161/169/201)",
    "torchvision MobileNetV2",
    "torchvision MobileNetV3 (large, small)",
    "timm ResNet family (timm.models.resnet.ResNet: resnet*, resnext*, seresnet*, ...)",
    "ktkernels.models.ResNet (already anti-aliased: a no-op unless min_channels <= 3 adds the stem blur)",
)


def _handler_for(model: nn.Module) -> _Handler:
    for cls in type(model).__mro__:
        handler = _HANDLERS.get((cls.__module__, cls.__qualname__))
        if handler is not None:
            return handler
    cls = type(model)
    raise TypeError(
        f"antialias() does not know {cls.__module__}.{cls.__qualname__}. placement='adobe' supports: "
        + "; ".join(SUPPORTED)
        + ". placement='composer' works on any model."
    )
