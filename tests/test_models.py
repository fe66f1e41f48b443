"""ktkernels.models: the antialiased-cnns ResNet family, same layout, same checkpoints, same numbers."""

from __future__ import annotations

import pytest
import torch

from ktkernels import models
from ktkernels.blurpool import BlurPool2d, MaxThenBlur

BUILDERS = [name for name in models.__all__ if name[0].islower()]
pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def _oracle():
    # Test-only oracle (CC BY-NC-SA): imported, never copied.
    return pytest.importorskip("antialiased_cnns", reason="antialiased-cnns (test-only oracle) is not installed")


@pytest.mark.parametrize("pool_only", [True, False])
@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_layout_matches_antialiased_cnns(name: str, pool_only: bool) -> None:
    """Every builder: same keys, order and shapes (``*.filt`` included); built on the meta device, no memory."""
    oracle = _oracle()
    with torch.device("meta"):
        theirs = getattr(oracle, name)(filter_size=3, pool_only=pool_only)
        ours = getattr(models, name)(filter_size=3, pool_only=pool_only)
    assert _layout(ours) == _layout(theirs)


@pytest.mark.parametrize(
    ("name", "filter_size", "pool_only"),
    [("resnet18", 4, True), ("resnet18", 3, False), ("resnet50", 4, True), ("resnet50", 5, False)],
)
def test_checkpoint_loads_strict_and_outputs_match(name: str, filter_size: int, pool_only: bool) -> None:
    oracle = _oracle()
    theirs = getattr(oracle, name)(filter_size=filter_size, pool_only=pool_only).eval()
    ours = getattr(models, name)(filter_size=filter_size, pool_only=pool_only).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    # Fused blurs sum in another order than F.conv2d: a few ulp per layer, relative to the logits' scale.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_layout_without_the_oracle() -> None:
    """What the oracle would check, spelled out: the blur sites of antialiased-cnns' resnet50."""
    with torch.device("meta"):
        model = models.resnet50()
    filts = {key: tuple(value.shape) for key, value in model.state_dict().items() if key.endswith(".filt")}
    assert filts == {
        "maxpool.1.filt": (64, 1, 4, 4),
        "layer2.0.conv3.0.filt": (128, 1, 4, 4),
        "layer2.0.downsample.0.filt": (256, 1, 4, 4),
        "layer3.0.conv3.0.filt": (256, 1, 4, 4),
        "layer3.0.downsample.0.filt": (512, 1, 4, 4),
        "layer4.0.conv3.0.filt": (512, 1, 4, 4),
        "layer4.0.downsample.0.filt": (1024, 1, 4, 4),
    }
    assert isinstance(model.maxpool, MaxThenBlur)
    assert model.conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    deep = models.resnet18(pool_only=False, num_classes=7).eval()
    assert deep.conv1.stride == (1, 1) and isinstance(deep.maxpool[0], BlurPool2d)
    with torch.no_grad():
        assert deep(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_pretrained_is_refused_with_a_pointer() -> None:
    with pytest.raises(ValueError, match="load_state_dict"):
        models.resnet50(pretrained=True)


def test_kwargs_reach_resnet() -> None:
    with torch.device("meta"):
        model = models.resnet50(num_classes=10, replace_stride_with_dilation=[False, False, True])
    assert model.fc.out_features == 10
    # A dilated stage has no stride, so no blur and no strided conv.
    assert not any(isinstance(m, BlurPool2d) for m in model.layer4.modules())
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        models.resnet18(replace_stride_with_dilation=[True])
