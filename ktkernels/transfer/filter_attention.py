"""Attention on convolution filters (Mo, Cheng & Fang 2019, "Pay attention to convolution filters").

Every ``nn.Conv2d`` of a pre-trained network gets a learnable multiplier ``A`` on its weight (no sigmoid, initialised
to 1, so the model starts as exactly the pre-trained one):

    W' = W ⊙ A ⊙ M,    y = conv2d(x, W', b, stride, padding, dilation, groups)

with ``A`` of shape ``(C_out,)`` (``shape='out'``, one scalar per filter) or ``(C_out, C_in/groups)``
(``shape='out_in'``, one scalar per filter and input channel, broadcast over the kernel window; the authors call it
'full', accepted as an alias) and ``M`` an optional, non-trainable filter mask of shape ``(C_out,)`` set by
:func:`prune_filters`. The classifier is left as it is. Training alternates one-epoch phases with a fresh Adam
optimiser each (:func:`attention_phases`): ``f`` the classifier only, ``a`` the attention scales only (BatchNorm in
eval mode), ``b`` the BatchNorm affine parameters only (train mode). Regularisers, signs as published:
:func:`filter_attention_penalty`. After training, :func:`fold_filter_attention` multiplies the scales into the
weights and gives back plain convolutions (no run-time cost at inference).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> x = torch.randn(2, 3, 8, 8)
>>> before = net(x)
>>> [tuple(p.shape) for p in add_filter_attention(net)]
[(8,), (4,)]
>>> torch.equal(net(x), before)  # A = 1: exactly the pre-trained model
True
>>> sorted(net.state_dict())
['0.attn', '0.bias', '0.weight', '2.attn', '2.bias', '2.weight']
>>> masks = prune_filters(net, 0.25)  # the lowest floor(0.25 * C_out) filters of every layer
>>> [int((~m).sum()) for m in masks.values()]
[2, 1]
>>> type(fold_filter_attention(net)[0]).__name__
'Conv2d'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..checks import is_real

__all__ = [
    "FilterAttentionConv2d",
    "FilterRanking",
    "add_filter_attention",
    "apply_phase",
    "attention_phases",
    "filter_attention_layers",
    "filter_attention_penalty",
    "fold_filter_attention",
    "prune_filters",
    "rank_filters",
]

SHAPES = ("out", "out_in")
STRATEGIES = ("auto", "weight", "output")
PHASES = ("f", "a", "b")
_SHAPE_ALIASES = {"out": "out", "out_in": "out_in", "full": "out_in"}


def _check_shape(shape: str) -> str:
    if not isinstance(shape, str) or shape not in _SHAPE_ALIASES:
        raise ValueError(f"shape must be one of {SHAPES} (or 'full', the authors' name for 'out_in'), got {shape!r}")
    return _SHAPE_ALIASES[shape]


def _check_strategy(strategy: str, shape: str) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "output" and shape != "out":
        raise ValueError(
            "strategy='output' needs shape='out': per-(filter, input channel) scales cannot be applied "
            "to the output; use 'weight' or 'auto'"
        )
    return strategy


class FilterAttentionConv2d(nn.Conv2d):
    """A ``Conv2d`` whose weight is scaled by a learnable attention ``attn`` and an optional filter mask.

    ``y = conv2d(x, W ⊙ A ⊙ M, b)`` with the hyper-parameters (stride, padding, including string padding, dilation,
    groups, padding_mode) of ``nn.Conv2d``; the convolution itself is ``nn.Conv2d._conv_forward``, so every padding
    mode works.

    Parameters and buffers:
        weight: ``(C_out, C_in/groups, kh, kw)``, bias: ``(C_out,)`` or None, as in ``nn.Conv2d``.
        attn: ``(C_out,)`` for ``shape='out'`` or ``(C_out, C_in/groups)`` for ``shape='out_in'``, same dtype and
            device as the weight, initialised to 1. State-dict key ``<name>.attn``.
        filter_mask: None until :func:`prune_filters` sets it; then a bool buffer ``(C_out,)`` (False = pruned),
            saved in the state dict and moved by ``.to()``. The gradient into masked entries of ``attn`` is 0.

    How the scale is applied (``strategy``):

    * ``'weight'``: ``conv(x, W ⊙ (A ⊙ M))``. One elementwise kernel makes a transient copy of the weight,
      ``C_out·C_in/groups·kh·kw`` elements, which autograd keeps for the input gradient until backward; the
      backward adds a weight-sized product and reduction for ``dA``.
    * ``'output'`` (``shape='out'`` only): ``conv(x, W) · (A ⊙ M)[:, None, None] + b``, one ``torch.addcmul``.
      Equivalent because the scale of filter ``o`` is a scalar: ``(A_o W_o) ∗ x = A_o (W_o ∗ x)``. It costs one
      extra read and write of the output, ``N·C_out·H_out·W_out`` elements, and autograd keeps the unscaled output
      (an activation-sized tensor) for ``dA``.
    * ``'auto'`` (default): for ``shape='out'``, per call, whichever of the two tensors is smaller, comparing the
      per-filter sizes ``C_in/groups·kh·kw`` and ``N·H_out·W_out`` (ties scale the weight). ``H_out, W_out`` come
      from the input shape by the usual formula (with dilation; ``padding='same'`` keeps ``H, W``) without running
      anything, so the choice is a shape-only branch (no data-dependent control flow; fine under
      ``torch.compile``, which specialises on it). In torchvision's ResNet-50 at 224 px the weight is the smaller one
      in every layer as soon as the batch is >= 95: e.g. layer1's 3x3 convolution has 64·64·9 = 36,864 weight
      elements against 256·64·56·56 ≈ 51M output elements at batch 256. The output is smaller only for small
      batches in the last stages: layer4's 3x3 convolutions have 512·9 = 4,608 weight elements per filter against
      7·7 = 49 output positions per image, so they switch to output scaling for batches up to 94 (layer4's
      1x1 ``conv1`` below 42, layer3's 3x3 below 12, nothing in layer1-2 above batch 1). ``shape='out_in'`` always
      scales the weight: a per-input-channel scale has no output-side equivalent (it would have to scale the
      input once per filter).

    Either way the extra cost is small against the convolution (the weight copy is transient and at most the size
    of the weight); :func:`fold_filter_attention` removes it entirely for inference.

    Build one from a pre-trained convolution with :meth:`from_conv` (which keeps its weight and bias Parameter
    objects) or directly with ``nn.Conv2d``'s arguments plus ``shape`` and ``strategy``.
    """

    attn: nn.Parameter
    filter_mask: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        shape: str = "out",
        strategy: str = "auto",
    ) -> None:
        shape = _check_shape(shape)
        strategy = _check_strategy(strategy, shape)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.attn_shape = shape
        self._strategy = strategy
        size = (out_channels,) if shape == "out" else (out_channels, in_channels // groups)
        self.attn = nn.Parameter(torch.ones(size, device=self.weight.device, dtype=self.weight.dtype))
        self.register_buffer("filter_mask", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, shape: str = "out", strategy: str = "auto") -> FilterAttentionConv2d:
        """Wrap ``conv``: same ``weight``/``bias`` Parameter objects (values untouched, state-dict keys unchanged,
        optimisers holding them keep working), same hyper-parameters and training flag, ``attn`` = 1 on the
        weight's device and dtype. Hooks registered on ``conv`` are not carried over."""
        if isinstance(conv, FilterAttentionConv2d):
            raise ValueError("the convolution already carries filter attention")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        reason = _unsupported_reason(conv)
        if reason is not None:
            raise TypeError(f"cannot wrap this {type(conv).__name__}: {reason}")
        weight = conv.weight
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            dtype=weight.dtype,
            shape=shape,
            strategy=strategy,
        )
        new.weight = weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.attn = nn.Parameter(torch.ones(new.attn.shape, device=weight.device, dtype=weight.dtype))
        new.train(conv.training)
        return new

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation of weight and bias; ``attn`` back to 1 (the mask is kept)."""
        super().reset_parameters()
        attn = getattr(self, "attn", None)
        if attn is not None:
            with torch.no_grad():
                attn.fill_(1)

    @property
    def strategy(self) -> str:
        """``'auto'``, ``'weight'`` or ``'output'`` (see the class docstring); validated on assignment."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = _check_strategy(value, self.attn_shape)

    def output_spatial_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of size ``(..., H, W)``, from the shapes only."""
        h, w = input_size[-2], input_size[-1]
        if isinstance(self.padding, str):
            if self.padding == "same":
                return h, w
            padding = (0, 0)  # 'valid'
        else:
            padding = self.padding
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, padding, self.dilation, strict=True):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def resolved_strategy(self, input_size: Sequence[int]) -> str:
        """``'weight'`` or ``'output'``: how a call on an input of size ``(N, C_in, H, W)`` (or unbatched
        ``(C_in, H, W)``) applies the scale."""
        if self.attn_shape != "out" or self._strategy == "weight":
            return "weight"
        if self._strategy == "output":
            return "output"
        batch = input_size[0] if len(input_size) == 4 else 1
        h_out, w_out = self.output_spatial_size(input_size)
        per_filter_weight = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
        return "output" if batch * h_out * w_out < per_filter_weight else "weight"

    def scale(self) -> Tensor:
        """``A ⊙ M``: the effective multiplier, the shape of ``attn``."""
        if self.filter_mask is None:
            return self.attn
        mask = self.filter_mask.to(self.attn.dtype)
        return self.attn * (mask if self.attn_shape == "out" else mask[:, None])

    def scaled_weight(self) -> Tensor:
        """``W ⊙ A ⊙ M``, ``(C_out, C_in/groups, kh, kw)`` (a new tensor; differentiable)."""
        scale = self.scale()
        return self.weight * (scale[:, None, None, None] if self.attn_shape == "out" else scale[:, :, None, None])

    def forward(self, input: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` or ``(C_in, H, W)`` -> ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)``."""
        if self.resolved_strategy(input.shape) == "output":
            out = self._conv_forward(input, self.weight, None)
            scale = self.scale().to(out.dtype)[:, None, None]  # broadcasts over batched and unbatched outputs
            if self.bias is None:
                return out * scale
            return torch.addcmul(self.bias.to(out.dtype)[:, None, None], out, scale)
        return self._conv_forward(input, self.scaled_weight(), self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A pruned checkpoint loads into an unpruned module: create the mask buffer, then copy into it as usual.
        key = prefix + "filter_mask"
        if self.filter_mask is None and isinstance(state_dict.get(key), Tensor):
            self.filter_mask = torch.ones(self.out_channels, dtype=torch.bool, device=self.weight.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, attn_shape={self.attn_shape}, strategy={self._strategy}"
        if self.filter_mask is not None:
            s += f", pruned={int(self.out_channels - self.filter_mask.sum())}"
        return s


def _unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why a Conv2d (sub)class instance cannot be wrapped, or None."""
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return "its class overrides forward/_conv_forward (the wrapper would drop that behaviour)"
    if parametrize.is_parametrized(conv):
        return "it is parametrized (torch.nn.utils.parametrize); wrap it before registering parametrizations"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialised yet (lazy module); run a forward pass first"
    if not isinstance(conv.weight, nn.Parameter):
        return "its weight is not an nn.Parameter (weight_norm / spectral_norm style hooks?)"
    return None


def _replace_modules(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Swap every reference to the modules in ``replacement`` (keyed by id), shared ones included."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, name, replacement[id(child)])


def add_filter_attention(
    model: nn.Module, shape: str = "out", layers: Iterable[str] | str | None = None, strategy: str = "auto"
) -> list[nn.Parameter]:
    """Replace the convolutions of ``model`` in place by :class:`FilterAttentionConv2d` (attention = 1).

    Args:
        model: the network; it must contain the convolutions (a bare ``nn.Conv2d`` cannot be replaced in place:
            wrap it, e.g. ``nn.Sequential(conv)``, or use :meth:`FilterAttentionConv2d.from_conv`).
        shape: ``'out'`` (``C_out`` scalars per layer) or ``'out_in'`` (``C_out·C_in/groups``; alias ``'full'``).
        layers: qualified module names (``'layer1.0.conv2'``) to wrap, or None for every convolution. A single
            string is one name.
        strategy: see :class:`FilterAttentionConv2d`.

    Which modules: instances of ``nn.Conv2d`` and of subclasses that override neither ``forward`` nor
    ``_conv_forward``; with ``layers=None``, other subclasses (e.g. padding-adjusting "same" convolutions),
    parametrized convolutions and ones whose weight is not a Parameter are skipped with a warning; naming one in
    ``layers`` raises TypeError. A module reachable under several names is replaced everywhere.

    Returns:
        the new ``attn`` parameters, in module order (as ``model.named_modules()`` visits them).

    Raises:
        TypeError: ``model`` is a bare Conv2d; a named layer is not a (supported) Conv2d.
        ValueError: bad shape/strategy; unknown layer names; a convolution already carries attention; no
            convolution to wrap; an uninitialised lazy convolution.
    """
    shape = _check_shape(shape)
    _check_strategy(strategy, shape)
    if isinstance(model, nn.Conv2d):
        raise TypeError(
            "model is a bare Conv2d, which cannot be replaced in place: wrap it (nn.Sequential(conv)) or "
            "use FilterAttentionConv2d.from_conv(conv)"
        )
    named = list(model.named_modules())
    convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d)]
    targets: list[tuple[str, nn.Conv2d]] = []
    if layers is None:
        wrapped = [n for n, m in convs if isinstance(m, FilterAttentionConv2d)]
        if wrapped:
            raise ValueError(f"the model already carries filter attention ({_few(wrapped)}); no double wrapping")
        skipped = []
        for name, conv in convs:
            reason = _unsupported_reason(conv)
            if reason is None:
                targets.append((name, conv))
            elif isinstance(conv.weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"{name!r}: {reason}")
            else:
                skipped.append(f"{name} ({reason})")
        if skipped:
            warnings.warn(
                f"add_filter_attention skipped {len(skipped)} convolution(s): {'; '.join(skipped)}", stacklevel=2
            )
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"layers must be module names (str), got {names!r}")
        unknown = [n for n in names if not _resolves(model, n)]
        if unknown:
            raise ValueError(
                f"unknown layer name(s) {unknown}; convolutions in the model: {_few([n for n, _ in convs]) or 'none'}"
            )
        seen: set[int] = set()
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, FilterAttentionConv2d):
                raise ValueError(f"{name!r} already carries filter attention; no double wrapping")
            if not isinstance(module, nn.Conv2d):
                raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Conv2d")
            reason = _unsupported_reason(module)
            if reason is not None:
                if isinstance(module.weight, nn.parameter.UninitializedParameter):
                    raise ValueError(f"{name!r}: {reason}")
                raise TypeError(f"cannot wrap {name!r} ({type(module).__name__}): {reason}")
            if id(module) not in seen:
                seen.add(id(module))
                targets.append((name, module))
    if not targets:
        raise ValueError("no nn.Conv2d to wrap in the model")
    replacement = {id(conv): FilterAttentionConv2d.from_conv(conv, shape, strategy) for _, conv in targets}
    _replace_modules(model, replacement)
    new = {id(m) for m in replacement.values()}
    return [m.attn for m in model.modules() if id(m) in new]


def _resolves(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _few(names: list[str], k: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def filter_attention_layers(model: nn.Module) -> dict[str, FilterAttentionConv2d]:
    """Qualified name -> :class:`FilterAttentionConv2d`, in module order (``model`` itself is named ``''``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FilterAttentionConv2d)}


def _require_layers(model: nn.Module, what: str) -> dict[str, FilterAttentionConv2d]:
    layers = filter_attention_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no filter attention layers (call add_filter_attention first)")
    return layers


def filter_attention_penalty(model: nn.Module, kind: str = "l2", weight: float = 1.0) -> Tensor:
    """The regulariser to add to the cross-entropy loss, signs as published; a 0-dim tensor on the parameters'
    device, differentiable with respect to the ``attn`` parameters only.

    * ``'l2'`` ("spread"): ``R = -weight · Σ_layers mean((A_layer - 1)²)``. It is NEGATIVE: minimising the loss
      rewards moving the scales away from 1, so it is unbounded below and must be kept small against the
      classification loss (the authors used weight 1 in one script and 1e-2 in their notebooks). Gradient
      ``-2·weight·(A - 1)/A.numel()`` per layer.
    * ``'l1'``: ``R = weight · Σ_layers ‖A_layer‖₁ / N``, ``N`` the number of attention scalars over all layers: a
      sparsity push towards 0. Gradient ``weight·sign(A)/N``.

    Masks are ignored: the raw ``attn`` values enter (masked entries receive the penalty's gradient but have no
    effect on the output).
    """
    if kind not in ("l2", "l1"):
        raise ValueError(f"kind must be 'l2' or 'l1', got {kind!r}")
    attns = [m.attn for m in _require_layers(model, "filter_attention_penalty").values()]
    if kind == "l2":
        total = sum(((a - 1) ** 2).mean() for a in attns)
        return -weight * total
    count = sum(a.numel() for a in attns)
    return weight * sum(a.abs().sum() for a in attns) / count


class FilterRanking(NamedTuple):
    """A layer's filters by importance: ``order`` (LongTensor ``(C_out,)``) the channel indices by descending
    score, equal scores by ascending channel index; ``scores`` (``(C_out,)``, attn's dtype, detached)."""

    order: Tensor
    scores: Tensor


def _scores(layer: FilterAttentionConv2d) -> Tensor:
    attn = layer.attn.detach().abs()
    return attn if layer.attn_shape == "out" else attn.mean(dim=1)


def _ranking(scores: Tensor) -> FilterRanking:
    order = torch.sort(scores, descending=True, stable=True).indices
    return FilterRanking(order, scores)


def rank_filters(model: nn.Module) -> dict[str, FilterRanking]:
    """Per attention layer, the filters by score: ``|A_o|`` for ``'out'``, ``mean_i |A_{o,i}|`` for
    ``'out_in'``; filters masked by :func:`prune_filters` score 0."""
    result = {}
    for name, layer in _require_layers(model, "rank_filters").items():
        scores = _scores(layer)
        if layer.filter_mask is not None:
            scores = scores * layer.filter_mask.to(scores.dtype)
        result[name] = _ranking(scores)
    return result


@torch.no_grad()
def prune_filters(model: nn.Module, fraction: float) -> dict[str, Tensor]:
    """Mask, in every attention layer, the ``floor(fraction · C_out)`` filters with the lowest scores (those of
    :func:`rank_filters`), i.e. the tail of the ranking: among equal scores the higher channel index goes first.

    The scores are recomputed from ``attn`` on every call, ignoring any earlier mask: calls are not cumulative, a
    filter masked before can come back, and ``fraction=0`` removes the masks' effect (all True). The mask is the
    ``filter_mask`` buffer (saved in the state dict, moved by ``.to()``); ``W' = W ⊙ A ⊙ M``, so masked filters
    output their bias and their ``attn`` gets zero gradient. The authors prune a quarter (``fraction=0.25``).

    Returns:
        qualified name -> bool mask ``(C_out,)`` (True = kept), a copy.
    """
    if not is_real(fraction) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    result = {}
    for name, layer in _require_layers(model, "prune_filters").items():
        scores = _scores(layer)
        count = math.floor(fraction * layer.out_channels)
        mask = torch.ones(layer.out_channels, dtype=torch.bool, device=scores.device)
        if count:
            mask[_ranking(scores).order[-count:]] = False
        layer.filter_mask = mask
        result[name] = mask.clone()
    return result


@torch.no_grad()
def fold_filter_attention(model: nn.Module) -> nn.Module:
    """Replace every :class:`FilterAttentionConv2d` by a plain ``nn.Conv2d`` with weight ``W ⊙ A ⊙ M`` (a new
    Parameter, same dtype, device, memory format and ``requires_grad``; same hyper-parameters and training flag) and
    the same bias Parameter object. In place; returns ``model``, or the new convolution when ``model`` itself is a
    :class:`FilterAttentionConv2d`. Outputs agree with the unfolded model up to fp rounding (bit-equal to the
    ``'weight'`` strategy, which computes the same product)."""
    layers = _require_layers(model, "fold_filter_attention")
    replacement: dict[int, nn.Module] = {}
    for layer in layers.values():
        if id(layer) in replacement:
            continue
        conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            device="meta",
            dtype=layer.weight.dtype,
        )
        conv.weight = nn.Parameter(layer.scaled_weight().detach(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            conv.bias = layer.bias
        conv.train(layer.training)
        replacement[id(layer)] = conv
    if id(model) in replacement:
        return replacement[id(model)]
    _replace_modules(model, replacement)
    return model


def _dedup(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _classifier_names(classifier: str | Sequence[str]) -> list[str]:
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"classifier must be a module name or a non-empty sequence of them, got {classifier!r}")
    return names


def _phase_params(model: nn.Module, phase: str, classifier: str | Sequence[str]) -> list[nn.Parameter]:
    if not isinstance(phase, str) or phase.lower() not in PHASES:
        raise ValueError(f"phase must be one of 'f', 'a', 'b' (either case), got {phase!r}")
    phase = phase.lower()
    if phase == "f":
        names = _classifier_names(classifier)
        unknown = [n for n in names if not _resolves(model, n)]
        if unknown:
            raise ValueError(f"unknown classifier module name(s) {unknown}")
        params = _dedup(p for n in names for p in model.get_submodule(n).parameters())
        what = f"the classifier {names}"
    elif phase == "a":
        params = [m.attn for m in _require_layers(model, "phase 'a'").values()]
        what = "the attention layers"
    else:
        params = _dedup(p for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters())
        what = "the BatchNorm modules (affine=True)"
    if not params:
        raise ValueError(f"phase {phase!r}: {what} have no parameters")
    return params


def apply_phase(model: nn.Module, phase: str, classifier: str | Sequence[str] = "fc") -> list[nn.Parameter]:
    """Set up one training phase (letters case-insensitive) and return its parameters.

    * ``'f'``: the classifier's parameters (``classifier``: module name(s), e.g. ``'fc'``), ``model.eval()``.
    * ``'a'``: the ``attn`` parameters, ``model.eval()`` (BatchNorm statistics frozen).
    * ``'b'``: the affine parameters of every BatchNorm module (any ``_BatchNorm`` subclass), ``model.train()``
      (running statistics update). The authors selected parameters whose names contain "bn", which in torchvision's
      ResNets misses the ``downsample.1`` BatchNorms; here every BatchNorm module is included.

    Exactly the returned parameters get ``requires_grad=True``; every other parameter of ``model`` gets False.
    """
    params = _phase_params(model, phase, classifier)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train(phase.lower() == "b")
    return params


def attention_phases(
    model: nn.Module,
    schedule: str = "FFaaabaaabaa",
    classifier: str | Sequence[str] = "fc",
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    **optimizer_kwargs: Any,
) -> Iterator[tuple[str, torch.optim.Optimizer]]:
    """The authors' schedule: one phase per letter (one epoch each), with a NEW optimiser (default Adam with its
    default settings, or ``optimizer(params, **optimizer_kwargs)``) at every phase.

    Yields ``(letter, optimizer)`` with the letter in lower case, after :func:`apply_phase`. Letters are
    case-insensitive: the authors' schedule has an upper-case ``F`` whose distinct meaning (if any) is not
    recoverable from their code, so ``F`` is treated as ``f``. The schedule and the classifier names (and, when
    the schedule needs them, the attention layers and BatchNorm parameters) are checked when this function is
    called, before anything is yielded.

    Example loop::

        for phase, opt in attention_phases(model, "FFaaabaaabaa"):
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if phase == "a":
                    loss = loss + filter_attention_penalty(model, "l2", 1e-2)
                loss.backward()
                opt.step()
    """
    if not isinstance(schedule, str) or not schedule:
        raise ValueError(f"schedule must be a non-empty string of the letters f, a, b, got {schedule!r}")
    bad = sorted({c for c in schedule if c.lower() not in PHASES})
    if bad:
        raise ValueError(f"schedule {schedule!r} has letters other than f, a, b (either case): {bad}")
    _classifier_names(classifier)
    for letter in sorted({c.lower() for c in schedule}):
        _phase_params(model, letter, classifier)

    def phases() -> Iterator[tuple[str, torch.optim.Optimizer]]:
        for letter in schedule.lower():
            params = apply_phase(model, letter, classifier)
            yield letter, optimizer(params, **optimizer_kwargs)

    return phases()
