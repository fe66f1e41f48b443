"""Teacher and student networks for knowledge-transferred fine-tuning, and the stages tapped for the transfer loss.

The teacher is a plain classification CNN (torchvision or timm) that :func:`ktkernels.antialias` supports; the
student is ``antialias(deepcopy(teacher))``, which keeps every weight and every stage's module name, so the same
names tap both networks.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..compat import antialias

__all__ = [
    "ModelError",
    "build_teacher",
    "classifier_outputs",
    "default_stages",
    "demo_teacher",
    "make_student",
    "replace_classifier",
]

#: Default stages (module names) per family: the outputs of the four resolution stages.
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_DENSENET_STAGES = ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4")


class ModelError(ValueError):
    """A bad architecture, weights file or stage name (the CLI prints it as one line)."""


def default_stages(model: nn.Module) -> list[str]:
    """The four stage outputs of a ResNet-family (torchvision, timm, ktkernels) or DenseNet model.

    Other architectures have no default: pass the module names (``named_modules()``) to tap.
    """
    names = {n for n, _ in model.named_modules()}
    for stages in (_RESNET_STAGES, _DENSENET_STAGES):
        if all(s in names for s in stages):
            return list(stages)
    raise ModelError(
        f"no default stages for {type(model).__name__}: give the module names to tap (e.g. --stages a,b,c)"
    )


def check_stages(model: nn.Module, stages: Sequence[str]) -> list[str]:
    """``stages`` if every name is a module of ``model``, else a :class:`ModelError` naming the unknown ones."""
    names = {n for n, _ in model.named_modules()}
    unknown = [s for s in stages if s not in names]
    if unknown or not stages:
        known = [n for n in names if n and "." not in n]
        raise ModelError(f"unknown stage name(s) {unknown or '(none given)'}; top-level modules: {sorted(known)}")
    return list(stages)


def build_teacher(
    arch: str,
    num_classes: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    tv_weights: str | None = None,
) -> nn.Module:
    """A plain classification CNN by name: ``"resnet50"`` (torchvision), ``"timm:resnet50"`` or ``"demo"``.

    Args:
        arch: torchvision model name, ``timm:<name>``, or ``demo`` (:func:`demo_teacher`, the digits network).
        num_classes: classes of the classifier head (default: the architecture's, 1000).
        weights: a local checkpoint (a state dict, or a dict holding one under ``state_dict`` / ``model``).
        tv_weights: torchvision's own weight enum name (e.g. ``"IMAGENET1K_V1"``): torchvision downloads it unless
            it is already in the torch hub cache, so offline machines need ``weights=``.
    """
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch == "demo":
        if tv_weights is not None:
            raise ModelError("the demo network has no torchvision weights: pass a weights file")
        model = demo_teacher(**kwargs)
    elif arch.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ModelError(f"{arch}: timm is not installed") from e
        name = arch.removeprefix("timm:")
        if name not in timm.list_models():
            raise ModelError(f"unknown timm architecture {name!r}")
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"unknown architecture {arch!r}: a torchvision classification model or timm:<name>")
        if tv_weights is not None:
            try:
                torchvision.models.get_model_weights(arch)[tv_weights]
            except KeyError:
                names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
                raise ModelError(f"{arch} has no torchvision weights {tv_weights!r} (it has: {names})") from None
        model = torchvision.models.get_model(arch, weights=tv_weights, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local checkpoint into ``model`` strictly; one-line :class:`ModelError` on any problem."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-checkpoint file
        raise ModelError(f"cannot read weights {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise ModelError(f"weights {path} do not fit {type(model).__name__}: {' '.join(first)}") from e


def make_student(teacher: nn.Module, **antialias_kwargs) -> nn.Module:
    """``antialias(deepcopy(teacher))``: the same weights and module names, with blur-pooled downsampling."""
    try:
        return antialias(copy.deepcopy(teacher), **antialias_kwargs)
    except TypeError as e:
        raise ModelError(str(e).split(". placement=")[0]) from e


def demo_teacher(num_classes: int = 10) -> nn.Module:
    """A one-block-per-stage torchvision ResNet (BasicBlock, [1, 1, 1, 1], 4.9M parameters) for the digits demo."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the last ``nn.Linear`` in registration order (torchvision's ``fc`` /
    ``classifier``, timm's ``fc`` / ``head.fc``)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def classifier_outputs(model: nn.Module) -> int:
    """Number of classes the model's classifier (its last ``nn.Linear``) predicts."""
    return _classifier(model)[1].out_features


def replace_classifier(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """Give ``model`` a freshly initialised classifier for ``num_classes`` classes, in place (same name, dtype and
    device; ``nn.Linear``'s default initialisation from a generator seeded with ``seed``)."""
    name, old = _classifier(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model
