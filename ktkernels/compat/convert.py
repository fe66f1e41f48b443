"""``convert(model)``: swap every third-party blur layer in a model for its ktkernels equivalent, in place.

Layers are recognised by module and class name, so a package that is not installed is never imported.
Each replacement keeps the anchor's geometry, attributes and buffers (same state-dict keys, values loaded
from the original), and lands on the original's device.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import antialiased_cnns, composer, ffcv, kornia, timm

# (module prefix, class name) -> builder from the third-party instance. Module prefixes cover both the
# packages' current and older homes (timm.models.layers, antialiased-cnns' models_lpf, ffcv-imagenet scripts).
_Builder = Callable[[nn.Module], nn.Module]


def _adobe_2d(m: nn.Module) -> nn.Module:
    return antialiased_cnns.BlurPool(m.channels, _adobe_pad_type(m), m.filt_size, m.stride, m.pad_off)


def _adobe_1d(m: nn.Module) -> nn.Module:
    return antialiased_cnns.BlurPool1D(m.channels, _adobe_pad_type(m), m.filt_size, m.stride, m.pad_off)


def _adobe_legacy(m: nn.Module) -> nn.Module:
    return antialiased_cnns.Downsample(_adobe_pad_type(m), m.filt_size, m.stride, m.channels, m.pad_off)


def _adobe_pad_type(m: nn.Module) -> str:
    """antialiased-cnns keeps only the pad module; its class says the mode."""
    name = type(m.pad).__name__ if hasattr(m, "pad") else "Reflection"
    return "replicate" if name.startswith("Replication") else "zero" if name.startswith("Zero") else "reflect"


def _kornia_legacy_padding(m: nn.Module) -> bool:
    """kornia <= 0.8 padded (k-1)//2 on both sides (0.9: ((k-1)//2, k//2)); the layer's own package says which."""
    version = getattr(sys.modules.get(type(m).__module__.split(".")[0]), "__version__", "0.9")
    numbers = [int(part) for part in re.findall(r"\d+", version)[:2]]
    return tuple(numbers + [0] * (2 - len(numbers))) <= (0, 8)  # "1" is (1, 0)


def _kornia_blur(m: nn.Module) -> nn.Module:
    return kornia.BlurPool2D(m.kernel_size, m.stride, legacy_even_padding=_kornia_legacy_padding(m))


def _kornia_max(m: nn.Module) -> nn.Module:
    return kornia.MaxBlurPool2D(m.kernel_size, m.stride, m.max_pool_size, legacy_even_padding=_kornia_legacy_padding(m))


def _kornia_edge_aware(m: nn.Module) -> nn.Module:
    return kornia.EdgeAwareBlurPool2D(m.kernel_size, m.edge_threshold, m.edge_dilation_kernel_size)


def _timm_blur(m: nn.Module) -> nn.Module:
    return timm.BlurPool2d(m.channels, m.filt_size, m.stride, m.pad_mode, device=m.filt.device, dtype=m.filt.dtype)


def _composer_blur(m: nn.Module) -> nn.Module:
    return composer.BlurPool2d(m.channels, m.stride, m.padding)


def _composer_max(m: nn.Module) -> nn.Module:
    # Composer's layer ignores ceil_mode (one row short of MaxPool2d's); ktkernels' honours it, so keep the sizes.
    return composer.BlurMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=False)


def _composer_conv(m: nn.Module) -> nn.Module:
    c = m.conv  # blur_first=False: the conv runs at stride 1 and the blur at m.blur_stride
    stride = c.stride if m.blur_first else m.blur_stride
    geometry = (c.kernel_size, stride, c.padding, c.dilation, c.groups, c.bias is not None, m.blur_first)
    options = dict(padding_mode=c.padding_mode, device=c.weight.device, dtype=c.weight.dtype)
    conv = composer.BlurConv2d(c.in_channels, c.out_channels, *geometry, **options)
    conv.adopt_conv(m.conv)  # the very Parameters (optimizers), any conv subclass and its hooks
    return conv


def _ffcv_conv(m: nn.Module) -> nn.Module:
    return ffcv.BlurPoolConv2d(m.conv)


_CONVERTERS: dict[str, dict[str, _Builder]] = {
    "antialiased_cnns": {"BlurPool": _adobe_2d, "BlurPool1D": _adobe_1d, "Downsample": _adobe_legacy},
    "models_lpf": {"Downsample": _adobe_legacy, "Downsample1D": _adobe_1d},
    "kornia": {"BlurPool2D": _kornia_blur, "MaxBlurPool2D": _kornia_max, "EdgeAwareBlurPool2D": _kornia_edge_aware},
    "timm": {"BlurPool2d": _timm_blur},
    "composer": {"BlurPool2d": _composer_blur, "BlurMaxPool2d": _composer_max, "BlurConv2d": _composer_conv},
    # ffcv-imagenet defines BlurPoolConv2d in its training script, not in the ffcv package.
    "*": {"BlurPoolConv2d": _ffcv_conv},
}


def _builder_for(module: nn.Module) -> _Builder | None:
    cls = type(module)
    if cls.__module__.startswith("ktkernels."):
        return None
    root = cls.__module__.split(".")[0]
    return _CONVERTERS.get(root, {}).get(cls.__name__) or _CONVERTERS["*"].get(cls.__name__)


@dataclass
class ConversionReport:
    """What :func:`convert` replaced: ``(qualified name, original class, new class)`` per layer."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"converted {len(self)} layer(s)"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.replaced]
        return "\n".join(lines)


def _match_buffers(new: nn.Module, old: nn.Module) -> None:
    """Put ``new`` on ``old``'s device and give same-named buffers ``old``'s dtype (a ``.half()`` model)."""
    device = next((t.device for t in (*old.parameters(), *old.buffers())), None)
    if device is not None:
        new.to(device)
    old_buffers = dict(old.named_buffers())
    for name, buffer in list(new.named_buffers()):
        if name in old_buffers and "." not in name:
            setattr(new, name, buffer.to(old_buffers[name].dtype))


# The hook tables of nn.Module that a forward or backward reads. The replacement takes the original's very dicts,
# so the handles the user holds (weak references to those dicts) still remove the hooks.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _move_hooks(new: nn.Module, old: nn.Module) -> None:
    for table in _HOOK_TABLES:
        hooks = getattr(old, table, None)
        if hooks:
            hooks.update(getattr(new, table, {}))  # none so far: the replacements register no hooks of their own
            setattr(new, table, hooks)
    if old._backward_hooks or old._backward_pre_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def convert(model: nn.Module) -> ConversionReport:
    """Replace, in place, every antialiased-cnns / kornia / timm / Composer / FFCV blur layer in ``model``.

    Outputs stay equal to the originals' within fp32 rounding and ``state_dict()`` keys are unchanged
    (buffers are loaded from the original layers). A layer used in several places gets one replacement, used in
    all of them, and the forward and backward hooks registered on a layer move to its replacement (their handles
    still remove them). A ``model`` that is itself such a layer cannot be replaced in place: wrap it (e.g. in
    ``nn.Sequential``) first.

    >>> import torch
    >>> report = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))   # nothing to replace
    >>> len(report)
    0
    """
    if _builder_for(model) is not None:
        raise TypeError(f"convert() replaces layers inside a model; wrap the {type(model).__name__} in a container")
    report = ConversionReport()
    names = {id(m): name for name, m in model.named_modules()}
    # Build every replacement first: a layer that cannot be converted leaves the model untouched.
    swaps = []
    built: dict[int, nn.Module] = {}  # id(original) -> its one replacement
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            build = _builder_for(child)
            if build is None:
                continue
            new = built.get(id(child))
            if new is None:
                new = built[id(child)] = build(child)
                new.load_state_dict(child.state_dict(), strict=True)
                _match_buffers(new, child)
                new.train(child.training)
                _move_hooks(new, child)
            swaps.append((parent, child_name, child, new))
    for parent, child_name, child, new in swaps:
        setattr(parent, child_name, new)
        qualified = f"{names[id(parent)]}.{child_name}".lstrip(".")
        old_name = f"{type(child).__module__}.{type(child).__qualname__}"
        report.replaced.append((qualified, old_name, f"{type(new).__module__}.{type(new).__qualname__}"))
    return report
