"""End-to-end model benchmark: the layer swaps behind ``python -m ktkernels.bench model``, and a tiny train step.

The unit tests check that the recipe and floor variants are the ktkernels anti-aliased model with only the blur
layers swapped (same shapes everywhere, the recipe numerically equal). ``test_train_step`` is a pytest-benchmark
case (CPU, ResNet-18 at batch 2, 64x64): in the normal test run benchmarks are disabled and it runs once.
Compare runs over time with ``pytest benchmarks/bench_model.py --benchmark-enable``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ktkernels
from ktkernels.bench.model import RecipeBlur, Subsample, count_blur_layers, make_trainer, to_floor, to_recipe

torchvision = pytest.importorskip("torchvision")
antialias = pytest.importorskip("ktkernels.compat.antialias").antialias

TINY = (2, 3, 64, 64)


def _aa_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return antialias(torchvision.models.resnet18(weights=None, num_classes=10), placement="adobe", filt_size=4)


def _stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stem and every stage's output, then the logits: where a swap that changed geometry would show."""
    outputs: dict[str, torch.Tensor] = {}
    names = ("maxpool", "layer1", "layer2", "layer3", "layer4")
    hooks = [
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name in names
    ]
    try:
        outputs["logits"] = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def test_swaps_keep_shapes_and_recipe_matches_ktkernels():
    aa = _aa_resnet18()
    recipe, floor = to_recipe(aa), to_floor(aa)
    assert count_blur_layers(aa) == 7 and count_blur_layers(recipe) == 0 and count_blur_layers(floor) == 0
    assert sum(isinstance(m, RecipeBlur) for m in recipe.modules()) == 7
    assert sum(isinstance(m, Subsample) for m in floor.modules()) == 7
    assert count_blur_layers(aa) == 7  # the swaps work on copies

    x = torch.randn(TINY).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([1, 7])
    got = {}
    for name, model in (("ktk", aa), ("recipe", recipe), ("floor", floor)):
        # eval(): train-mode BN over 2x2..4x4 maps turns ulp-level blur differences into 1e-5-level ones
        model = model.to(memory_format=torch.channels_last).eval()
        xg = x.detach().requires_grad_()
        outputs = _stage_outputs(model, xg)
        torch.nn.functional.cross_entropy(outputs["logits"], target).backward()
        got[name] = (outputs, xg.grad, model.conv1.weight.grad)
    for key, out in got["ktk"][0].items():
        assert got["floor"][0][key].shape == out.shape, key
        assert got["recipe"][0][key].shape == out.shape, key
        torch.testing.assert_close(got["recipe"][0][key], out, atol=1e-5, rtol=1e-5)
    # Same parameters and the same maths, so the gradients agree too (the ktkernels backward vs autograd's).
    # (Gradients here are ~1e-3..1e-1, so the tolerance is relative.)
    torch.testing.assert_close(got["recipe"][1], got["ktk"][1], atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(got["recipe"][2], got["ktk"][2], atol=1e-7, rtol=1e-4)


def test_swap_of_fused_max_blur_layer_unfuses_it():
    """A fused MaxBlurPool2d (``_max_kernel > 1``) becomes MaxPool2d(k, 1, p) + recipe / + subsampling."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ktkernels.MaxBlurPool2d(8, filt_size=4), nn.ReLU())
    recipe, floor = to_recipe(model), to_floor(model)
    assert isinstance(recipe[1], nn.Sequential) and isinstance(recipe[1][0], nn.MaxPool2d)
    assert isinstance(recipe[1][1], RecipeBlur) and isinstance(floor[1][1], Subsample)
    x = torch.randn(2, 3, 19, 20)
    torch.testing.assert_close(recipe(x), model(x), atol=1e-5, rtol=1e-5)
    assert floor(x).shape == model(x).shape


def test_floor_gradient_keeps_the_input_layout():
    """The floor's backward returns a channels_last gradient for a channels_last input (autograd's slice does not)."""
    layer = Subsample(filt_size=4, stride=2, padding=[1, 2, 1, 2], spatial_dims=2)
    x = torch.randn(2, 8, 9, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    assert y.shape == ktkernels.BlurPool2d(8)(x).shape
    grad = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    xs = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(xs[..., ::2, ::2], xs, grad)
    torch.testing.assert_close(gx, expected)


@pytest.mark.parametrize("variant", ["plain", "aa-ktk"])
def test_train_step(benchmark, variant):
    """One SGD step of ResNet-18 (batch 2, 64x64, fp32, channels_last) on CPU: plain vs ktkernels anti-aliased."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None)
    model = plain if variant == "plain" else antialias(copy.deepcopy(plain), placement="adobe", filt_size=4)
    x = torch.randn(TINY).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (TINY[0],))
    trainer = make_trainer(variant, model, x, y, amp=None, compile_model=False)
    benchmark.group = f"cpu resnet18 train step {TINY}"
    benchmark.pedantic(trainer.step, rounds=5, warmup_rounds=1)
