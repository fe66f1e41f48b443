"""antialias(model): plain torchvision / timm networks become anti-aliased ones with the same weights.

Random-init models (no downloads), small inputs on CPU. antialiased-cnns is a test-only oracle for layouts.
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktkernels import models
from ktkernels.blurpool import BlurLayer, BlurPool2d
from ktkernels.compat.antialias import SUPPORTED, antialias

tv = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _small_vgg11() -> nn.Module:
    """torchvision vgg11 with a global pool and a 10-way head: antialias never touches the head, and the
    stock 25088x4096 one would make every copy of the model cost 0.5 GB."""
    with torch.device("meta"):
        model = tv.vgg11()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, 10, device="meta")
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return model


def _timm_resnet18() -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm is not installed")
    return timm.create_model("resnet18", num_classes=10)


# name -> (builder, number of blur layers antialias adds with the defaults)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: tv.resnet18(num_classes=10), 7),
    "resnet50": (lambda: tv.resnet50(num_classes=10), 7),
    "resnext50_32x4d": (lambda: tv.resnext50_32x4d(num_classes=10), 7),
    "vgg11": (_small_vgg11, 5),
    "densenet121": (lambda: tv.densenet121(num_classes=10), 4),
    "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), 4),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), 4),
    "timm_resnet18": (_timm_resnet18, 7),
}


def _blurs(model: nn.Module) -> int:
    return sum(isinstance(m, BlurLayer) for m in model.modules())


def _layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_kept_output_shape_kept_and_idempotent(name: str) -> None:
    build, expected_blurs = MODELS[name]
    model = build().eval()
    teacher = copy.deepcopy(model)
    params_before = list(model.parameters())

    assert antialias(model) is model
    assert _blurs(model) == expected_blurs
    # The very Parameter objects, in the same order (optimizers stay valid), with the teacher's values.
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    student_params, teacher_params = list(model.parameters()), list(teacher.parameters())
    assert len(student_params) == len(teacher_params)
    for p_student, p_teacher in zip(student_params, teacher_params, strict=True):
        assert torch.equal(p_student, p_teacher)
    assert not any(m.training for m in model.modules())  # new layers follow the model's eval mode

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y_teacher, y_student = teacher(x), model(x)
    assert y_student.shape == y_teacher.shape and torch.isfinite(y_student).all()

    layout = _layout(model)
    antialias(model)
    assert _layout(model) == layout and _blurs(model) == expected_blurs
    with torch.no_grad():
        assert torch.equal(model(x), y_student)


# torchvision builder, min_channels, antialiased-cnns builder and kwargs
ORACLE_CASES = [
    ("resnet18", 16, "resnet18", {}),
    ("resnet18", 3, "resnet18", {"pool_only": False}),
    ("resnet50", 16, "resnet50", {}),
    ("vgg11", 16, "vgg11", {}),
    ("vgg13_bn", 16, "vgg13_bn", {}),
    ("densenet121", 16, "densenet121", {}),
    ("densenet121", 3, "densenet121", {"pool_only": False}),
    ("mobilenet_v2", 16, "mobilenet_v2", {}),
]


def _mobilenet_v2_head(key: str) -> str:
    # torchvision's classifier is [Dropout, Linear]; antialiased-cnns dropped the Dropout: [Linear].
    return key.replace("classifier.1.", "classifier.0.")


@pytest.mark.parametrize(("tv_name", "min_channels", "oracle_name", "kwargs"), ORACLE_CASES)
def test_layout_matches_antialiased_cnns(tv_name: str, min_channels: int, oracle_name: str, kwargs: dict) -> None:
    """Same keys, order and shapes as antialiased-cnns (meta device: no memory, no init)."""
    oracle = pytest.importorskip("antialiased_cnns", reason="antialiased-cnns (test-only oracle) is not installed")
    with torch.device("meta"):
        student = antialias(getattr(tv, tv_name)(), min_channels=min_channels)
        theirs = getattr(oracle, oracle_name)(filter_size=4, **kwargs)
    ours = _layout(student)
    if tv_name == "mobilenet_v2":
        ours = [(_mobilenet_v2_head(key), shape) for key, shape in ours]
    assert ours == _layout(theirs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11", "densenet121", "mobilenet_v2"])
def test_same_numbers_as_antialiased_cnns(name: str) -> None:
    """The student's weights in the antialiased-cnns model give the student's outputs (features for the
    models with a ``features`` trunk: their heads differ or are too big to be worth running)."""
    oracle = pytest.importorskip("antialiased_cnns", reason="antialiased-cnns (test-only oracle) is not installed")
    student = antialias(_small_vgg11() if name == "vgg11" else getattr(tv, name)()).eval()
    with torch.device("meta"):
        theirs = getattr(oracle, name)(filter_size=4)
    theirs = theirs.to_empty(device="cpu").eval()
    ours_part, theirs_part = (student, theirs) if name.startswith("resnet") else (student.features, theirs.features)
    theirs_part.load_state_dict(ours_part.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = theirs_part(x), ours_part(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_ktkernels_resnet_is_already_antialiased() -> None:
    model = models.resnet18()
    layout = _layout(model)
    antialias(model)
    assert _layout(model) == layout


def test_timm_resnet_matches_timm_aa_layer_except_the_shortcut() -> None:
    """antialias(timm resnet18, filt_size=3) puts the same blur where ``aa_layer=BlurPool2d`` puts timm's (k=3
    reflect: the same operator), plus the antialiased-cnns shortcut blur."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    student = antialias(timm.create_model("resnet18", num_classes=10), filt_size=3).eval()
    reference = timm.create_model("resnet18", num_classes=10, aa_layer=timm.layers.BlurPool2d).eval()
    for stage in (student.layer2, student.layer3, student.layer4):
        assert isinstance(stage[0].aa, BlurPool2d) and stage[0].conv1.stride == (1, 1)
        shortcut = stage[0].downsample
        assert isinstance(shortcut[0], BlurPool2d) and shortcut[1].stride == (1, 1)
        # Take the shortcut blur out again: the rest must be timm's own anti-aliased resnet18.
        stage[0].downsample = nn.Sequential(*shortcut[1:])
        stage[0].downsample[0].stride = (2, 2)
    missing, unexpected = reference.load_state_dict(student.state_dict(), strict=False)
    assert not missing and all(key.endswith(".filt") for key in unexpected)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student(x), reference(x), rtol=1e-5, atol=1e-6)


def _images(seed: int) -> torch.Tensor:
    """(2, 3, 64, 64) images with a natural-ish spectrum: smooth structure plus fine texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(2, 3, 8, 8, generator=g), size=(64, 64), mode="bicubic", align_corners=False)
    return coarse + 0.3 * torch.randn(2, 3, 64, 64, generator=g)


def _embedding(model: nn.Module) -> nn.Module:
    """The globally pooled last feature map (the head dropped), which a shift should not change."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(0)
    elif hasattr(model, "fc"):
        model.fc = nn.Identity()
    else:
        model.classifier = nn.Identity()
    return model


def _shift_change(model: nn.Module, x: torch.Tensor) -> float:
    """Mean relative change ||f(shift(x)) - f(x)|| / ||f(x)|| over circular shifts of 1-3 px."""
    changes = []
    with torch.no_grad():
        y = model(x)
        for shift in ((0, 1), (1, 2), (3, 1)):
            moved = model(torch.roll(x, shift, dims=(2, 3)))
            changes.append(((moved - y).norm(dim=1) / y.norm(dim=1)).mean())
    return torch.stack(changes).mean().item()


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2", "mobilenet_v3_small", "timm_resnet18"])
def test_shift_consistency_improves(name: str) -> None:
    """Same weights, eval mode: the anti-aliased student's features move far less under small shifts.

    Measured (random init, these seeds): the student moves 0.09-0.35x as much as the original.
    """
    teacher = _embedding(MODELS[name][0]()).eval()
    student = antialias(copy.deepcopy(teacher))
    for seed in (0, 1):
        x = _images(seed)
        before, after = _shift_change(teacher, x), _shift_change(student, x)
        assert before > 1e-3, "the original should not be shift-invariant already"
        assert after < 0.5 * before, f"{name}, seed {seed}: {after:.4f} vs {before:.4f}"


def test_new_layers_follow_device_and_dtype() -> None:
    model = antialias(tv.resnet18(num_classes=10).double().eval())
    assert all(m.filt.dtype == torch.float64 for m in model.modules() if isinstance(m, BlurPool2d))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_min_channels_leaves_narrow_layers() -> None:
    model = antialias(tv.resnet18(), min_channels=128)
    # layer2's convs and the stem see 64 channels: left alone; layer3/4 see 128/256: blurred.
    assert model.conv1.stride == (2, 2) and model.layer2[0].conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.layer3[0].conv1.stride == (1, 1) and isinstance(model.layer3[0].conv2[0], BlurPool2d)


def test_unknown_architecture_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.container\.Sequential.*torchvision ResNet") as info:
        antialias(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)))
    assert all(entry in str(info.value) for entry in SUPPORTED)


def test_bad_arguments_raise_before_any_surgery() -> None:
    model = tv.resnet18()
    layout = _layout(model)
    with pytest.raises(ValueError, match="placement"):
        antialias(model, placement="paper")
    with pytest.raises(ValueError):
        antialias(model, filt_size=9)
    with pytest.raises(ValueError):
        antialias(model, pad_type="circular")
    assert _layout(model) == layout and model.layer2[0].conv1.stride == (2, 2)
    model.layer3[0].conv1.stride = (2, 1)  # met after the stem and layer2: refused before any of them changes
    with pytest.raises(NotImplementedError, match="square"):
        antialias(model)
    assert _layout(model) == layout and model.layer2[0].conv1.stride == (2, 2)


def test_modules_keep_their_own_train_eval_mode() -> None:
    """Only the new layers and containers take the model's mode: a frozen BatchNorm inside a wrapped part (the
    downsample branch, VGG's features) stays in eval mode."""
    cases = ((tv.resnet18(), lambda m: m.layer2[0].downsample[1]), (tv.vgg11_bn(), lambda m: m.features[1]))
    for model, frozen in cases:
        norm = frozen(model).eval()
        model.training = True
        antialias(model)
        assert model.training and not norm.training and isinstance(norm, nn.BatchNorm2d)
        assert all(m.training for m in model.modules() if isinstance(m, BlurPool2d))


def test_composer_placement_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    """placement='composer' is exactly one call to ktkernels.compat.composer.apply_blurpool."""
    calls = []
    fake = types.ModuleType("ktkernels.compat.composer")
    fake.apply_blurpool = lambda model, **kwargs: calls.append((model, kwargs))
    monkeypatch.setitem(sys.modules, "ktkernels.compat.composer", fake)
    model = nn.Identity()  # any model: Composer's surgery is architecture-agnostic
    assert antialias(model, placement="composer", min_channels=8) is model
    assert calls == [(model, {"replace_convs": True, "replace_maxpools": True, "blur_first": True, "min_channels": 8})]


def test_composer_placement_runs() -> None:
    pytest.importorskip("ktkernels.compat.composer", reason="ktkernels.compat.composer is not there yet")
    model = tv.resnet18(num_classes=10).eval()
    teacher = copy.deepcopy(model)
    antialias(model, placement="composer")
    assert [p.shape for p in model.parameters()] == [p.shape for p in teacher.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), teacher.parameters(), strict=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == teacher(x).shape
    layout = _layout(model)
    antialias(model, placement="composer")
    assert _layout(model) == layout
    with torch.no_grad():
        assert torch.equal(model(x), y)
