"""Anti-aliased ResNet, ResNeXt and Wide-ResNet with the antialiased-cnns module layout (Zhang, ICML 2019).

Every builder makes the same ``nn.Sequential`` nesting, attribute names and state-dict keys (the ``*.filt``
buffers included) as ``antialiased_cnns.<name>(filter_size=..., pool_only=...)``, so its checkpoints load
with ``strict=True``; the blur layers are ktkernels' fused ones. Where the blurs go:

* stem, ``pool_only=True``: ``conv1`` (7x7, s2) -> bn1 -> relu -> ``maxpool = [MaxPool2d(2, 1), BlurPool]``
  (a :class:`~ktkernels.blurpool.MaxThenBlur`, one fused kernel);
* stem, ``pool_only=False``: ``conv1`` at stride 1 -> bn1 -> relu -> ``maxpool = [BlurPool, MaxPool2d(2, 1),
  BlurPool]``;
* strided BasicBlock: ``conv1`` at stride 1, ``conv2 = [BlurPool(planes, s), conv3x3]``;
* strided Bottleneck: ``conv2`` at stride 1, ``conv3 = [BlurPool(width, s), conv1x1]``;
* strided shortcut: ``downsample = [BlurPool(inplanes, s), conv1x1 (s1), BN]`` (a blur commutes with a 1x1
  conv, and blurring the narrower input is cheaper).

Example::

    >>> import torch
    >>> from ktkernels.models import resnet18
    >>> model = resnet18(num_classes=10).eval()
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    >>> model.layer2[0].conv2[0].filt.shape
    torch.Size([128, 1, 4, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..blurpool import BlurPool2d, MaxThenBlur

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(in_planes: int, out_planes: int, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 conv, stride 1, 'same' padding: (N, in, H, W) -> (N, out, H, W)."""
    return nn.Conv2d(in_planes, out_planes, 3, padding=dilation, groups=groups, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int) -> nn.Conv2d:
    """1x1 conv, stride 1: (N, in, H, W) -> (N, out, H, W)."""
    return nn.Conv2d(in_planes, out_planes, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; when strided, conv1 runs at stride 1 and the blur opens ``conv2``.

    (N, inplanes, H, W) -> (N, planes, ceil(H/stride), ceil(W/stride)).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        filter_size: int = 4,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got {groups} and {base_width}")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 is not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1:
            self.conv2: nn.Module = _conv3x3(planes, planes)
        else:
            self.conv2 = nn.Sequential(
                BlurPool2d(planes, filt_size=filter_size, stride=stride), _conv3x3(planes, planes)
            )
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet v1.5); when strided, conv2 runs at stride 1 and the blur opens ``conv3``.

    (N, inplanes, H, W) -> (N, 4 * planes, ceil(H/stride), ceil(W/stride)); the inner width is
    ``planes * base_width / 64 * groups``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        filter_size: int = 4,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, groups, dilation)
        self.bn2 = norm_layer(width)
        if stride == 1:
            self.conv3: nn.Module = _conv1x1(width, out_planes)
        else:
            # Blur after conv2 -> bn2 -> relu (the paper's placement), ahead of the cheap 1x1 conv.
            self.conv3 = nn.Sequential(
                BlurPool2d(width, filt_size=filter_size, stride=stride), _conv1x1(width, out_planes)
            )
        self.bn3 = norm_layer(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Anti-aliased ResNet: (N, 3, H, W) -> (N, num_classes) logits.

    The spatial size is halved five times (H/32 before the global pool). A reflect-padded blur needs its input
    larger than its pad, so the last blur (on a ~H/16 map) needs H, W >= 35 for ``filter_size`` 4 or 5 and
    H, W >= 19 for 3 (the same limits as antialiased-cnns; smaller inputs raise ``ValueError``).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: size of the final linear layer.
        zero_init_residual: zero the last BN weight of every residual branch.
        groups, width_per_group: ResNeXt cardinality and per-group width (Wide-ResNet: width_per_group=128).
        norm_layer: ``norm_layer(channels)``, default ``nn.BatchNorm2d``.
        filter_size: binomial blur size 1..7 (antialiased-cnns' ``filter_size``).
        pool_only: True: only the stem max pool is anti-aliased, conv1 keeps stride 2. False: conv1 runs at
            stride 1 and is followed by a blur too.
        replace_stride_with_dilation: three bools; a dilated stage has no stride and so no blur.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormLayer | None = None,
        filter_size: int = 4,
        pool_only: bool = True,
        replace_stride_with_dilation: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        dilate = list(replace_stride_with_dilation or [False, False, False])
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation should be None or 3 bools, got {dilate}")
        self.groups = groups
        self.base_width = width_per_group
        self.filter_size = filter_size

        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2 if pool_only else 1, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        stem_blur = BlurPool2d(self.inplanes, filt_size=filter_size, stride=2)
        if pool_only:
            self.maxpool: nn.Module = MaxThenBlur(nn.MaxPool2d(kernel_size=2, stride=1), stem_blur)
        else:
            self.maxpool = nn.Sequential(
                BlurPool2d(self.inplanes, filt_size=filter_size, stride=2),
                nn.MaxPool2d(kernel_size=2, stride=1),
                stem_blur,
            )
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            shortcut: list[nn.Module] = []
            if stride != 1:
                shortcut.append(BlurPool2d(self.inplanes, filt_size=self.filter_size, stride=stride))
            shortcut += [_conv1x1(self.inplanes, planes * block.expansion), self._norm_layer(planes * block.expansion)]
            downsample = nn.Sequential(*shortcut)
        common: dict[str, Any] = {
            "groups": self.groups,
            "base_width": self.base_width,
            "norm_layer": self._norm_layer,
            "filter_size": self.filter_size,
        }
        layers = [block(self.inplanes, planes, stride, downsample, dilation=previous_dilation, **common)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation, **common) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, 512 * expansion, H/32, W/32): everything before the global pool."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def _build(
    block: type[BasicBlock | Bottleneck],
    layers: Sequence[int],
    pretrained: bool,
    filter_size: int,
    pool_only: bool,
    **kwargs: Any,
) -> ResNet:
    if pretrained:
        raise ValueError(
            "ktkernels.models builds offline and downloads nothing: call it with pretrained=False, then "
            "model.load_state_dict(torch.load(path)['state_dict']) with an antialiased-cnns checkpoint "
            "(same keys and shapes, strict=True works)"
        )
    return ResNet(block, layers, filter_size=filter_size, pool_only=pool_only, **kwargs)


def resnet18(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``kwargs`` go to :class:`ResNet`."""
    return _build(BasicBlock, [2, 2, 2, 2], pretrained, filter_size, pool_only, **kwargs)


def resnet34(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNet-34 (BasicBlock, [3, 4, 6, 3]); ``kwargs`` go to :class:`ResNet`."""
    return _build(BasicBlock, [3, 4, 6, 3], pretrained, filter_size, pool_only, **kwargs)


def resnet50(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNet-50 (Bottleneck, [3, 4, 6, 3]); ``kwargs`` go to :class:`ResNet`."""
    return _build(Bottleneck, [3, 4, 6, 3], pretrained, filter_size, pool_only, **kwargs)


def resnet101(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNet-101 (Bottleneck, [3, 4, 23, 3]); ``kwargs`` go to :class:`ResNet`."""
    return _build(Bottleneck, [3, 4, 23, 3], pretrained, filter_size, pool_only, **kwargs)


def resnet152(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNet-152 (Bottleneck, [3, 8, 36, 3]); ``kwargs`` go to :class:`ResNet`."""
    return _build(Bottleneck, [3, 8, 36, 3], pretrained, filter_size, pool_only, **kwargs)


def resnext50_32x4d(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNeXt-50 32x4d (Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)."""
    return _build(Bottleneck, [3, 4, 6, 3], pretrained, filter_size, pool_only, groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased ResNeXt-101 32x8d (Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8)."""
    return _build(Bottleneck, [3, 4, 23, 3], pretrained, filter_size, pool_only, groups=32, width_per_group=8, **kwargs)


def wide_resnet50_2(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased Wide-ResNet-50-2 (Bottleneck, [3, 4, 6, 3], width_per_group=128)."""
    return _build(Bottleneck, [3, 4, 6, 3], pretrained, filter_size, pool_only, width_per_group=128, **kwargs)


def wide_resnet101_2(pretrained: bool = False, filter_size: int = 4, pool_only: bool = True, **kwargs: Any) -> ResNet:
    """Anti-aliased Wide-ResNet-101-2 (Bottleneck, [3, 4, 23, 3], width_per_group=128)."""
    return _build(Bottleneck, [3, 4, 23, 3], pretrained, filter_size, pool_only, width_per_group=128, **kwargs)
