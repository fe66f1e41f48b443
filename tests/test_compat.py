"""Compat layers: the anchors' geometry tables, the real kornia / timm / antialiased-cnns packages, Composer and
FFCV from the reference's worked examples, convert(), and every layer under compile / export / script / FX."""

from __future__ import annotations

import itertools
import math
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ktkernels
from ktkernels.blurpool import decomposed
from ktkernels.compat import antialiased_cnns as adobe
from ktkernels.compat import composer, convert, ffcv
from ktkernels.compat import kornia as kornia_compat
from ktkernels.compat import timm as timm_compat

EYE5 = torch.eye(5, dtype=torch.float64)[None, None]


def recipe(x: torch.Tensor, k: int, stride: int, pads: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """The anchors' recipe in float64, written here from the maths: pad, then depthwise binomial conv."""
    a = torch.tensor([float(math.comb(k - 1, i)) for i in range(k)], dtype=torch.float64)
    w = (torch.outer(a, a) / a.sum() ** 2).to(x)[None, None].expand(x.shape[1], 1, k, k)
    xp = F.pad(x, pads, mode={"zero": "constant"}.get(mode, mode))
    return F.conv2d(xp, w, stride=stride, groups=x.shape[1])


# ----------------------------------------------------------------------------------------------
# Reference section 2.3: output sizes at stride 2 per flavour ("err": the layer must refuse the input)

FLAVOUR_LAYERS = {
    "adobe k3 refl": lambda: adobe.BlurPool(2, filt_size=3),
    "adobe k4 refl": lambda: adobe.BlurPool(2, filt_size=4),
    "adobe k4 zero": lambda: adobe.BlurPool(2, "zero", filt_size=4),
    "kornia09 k3": lambda: kornia_compat.BlurPool2D(3),
    "kornia09 k4": lambda: kornia_compat.BlurPool2D(4),
    "kornia08 k3": lambda: kornia_compat.BlurPool2D(3, legacy_even_padding=True),
    "kornia08 k4": lambda: kornia_compat.BlurPool2D(4, legacy_even_padding=True),
    "timm k3": lambda: timm_compat.BlurPool2d(2, filt_size=3),
    "timm k4": lambda: timm_compat.BlurPool2d(2, filt_size=4),
    "composer": lambda: composer.BlurPool2d(2),
}
E = None  # the table's "err"
SIZE_TABLE = {  # H: one column per FLAVOUR_LAYERS entry, in order
    1: [E, E, 1, 1, 1, 1, E, E, E, 1],
    2: [1, E, 1, 1, 1, 1, 1, 1, E, 1],
    3: [2, 2, 2, 2, 2, 2, 1, 2, 2, 2],
    4: [2, 2, 2, 2, 2, 2, 2, 2, 3, 2],
    5: [3, 3, 3, 3, 3, 3, 2, 3, 3, 3],
    8: [4, 4, 4, 4, 4, 4, 4, 4, 5, 4],
    15: [8, 8, 8, 8, 8, 8, 7, 8, 8, 8],
    56: [28, 28, 28, 28, 28, 28, 28, 28, 29, 28],
    111: [56, 56, 56, 56, 56, 56, 55, 56, 56, 56],
    112: [56, 56, 56, 56, 56, 56, 56, 56, 57, 56],
}


@pytest.mark.parametrize("height", sorted(SIZE_TABLE))
def test_output_sizes_match_the_reference_table(height):
    x = torch.randn(1, 2, height, 9)
    for (name, make), expected in zip(FLAVOUR_LAYERS.items(), SIZE_TABLE[height], strict=True):
        layer = make()
        if expected is None:
            with pytest.raises(ValueError):
                layer(x)
        else:
            assert layer(x).shape[2] == expected, name
            with decomposed():
                assert layer(x).shape[2] == expected, f"{name} (decomposed)"


# Reference section 2.4: x = eye(5), stride 2
EYE_EXAMPLES = {
    "k3 zero": (
        [
            adobe.BlurPool(1, "zero", 3),
            kornia_compat.BlurPool2D(3),
            composer.BlurPool2d(1),
            timm_compat.create_aa("blurpc", channels=1),
        ],
        [[0.3125, 0.0625, 0], [0.0625, 0.375, 0.0625], [0, 0.0625, 0.3125]],
    ),
    "k3 reflect": (
        [adobe.BlurPool(1, filt_size=3), timm_compat.BlurPool2d(1)],
        [[0.5, 0.125, 0], [0.125, 0.375, 0.125], [0, 0.125, 0.5]],
    ),
    "k4 reflect": (
        [adobe.BlurPool(1)],
        [[0.40625, 0.109375, 0.015625], [0.109375, 0.3125, 0.28125], [0.015625, 0.28125, 0.40625]],
    ),
    "k4 zero": (
        [adobe.BlurPool(1, "zero"), kornia_compat.BlurPool2D(4)],
        [[0.296875, 0.09375, 0], [0.09375, 0.3125, 0.09375], [0, 0.09375, 0.15625]],
    ),
    "k4 kornia<=0.8": (
        [kornia_compat.BlurPool2D(4, legacy_even_padding=True)],
        [[0.296875, 0.09375], [0.09375, 0.3125]],
    ),
    "k4 timm": (
        [timm_compat.BlurPool2d(1, filt_size=4)],
        [[0.40625, 0.28125, 0.015625], [0.28125, 0.3125, 0.109375], [0.015625, 0.109375, 0.40625]],
    ),
}


@pytest.mark.parametrize("case", sorted(EYE_EXAMPLES))
def test_worked_eye5_examples(case):
    layers, expected = EYE_EXAMPLES[case]
    for layer in layers:
        torch.testing.assert_close(
            layer(EYE5),
            torch.tensor(expected, dtype=torch.float64)[None, None],
            rtol=0,
            atol=1e-12,
            msg=f"{case}: {type(layer).__module__}",
        )


# Reference section 2.4, 1-D: x = 1..6 and 1..5, stride 2
ONE_D = [
    (2, "reflect", [1.5, 3.5, 5.5], [1.5, 3.5, 4.5]),
    (2, "zero", [1.5, 3.5, 5.5], [1.5, 3.5, 2.5]),
    (3, "reflect", [1.5, 3.0, 5.0], [1.5, 3.0, 4.5]),
    (3, "replicate", [1.25, 3.0, 5.0], [1.25, 3.0, 4.75]),
    (3, "zero", [1.0, 3.0, 5.0], [1.0, 3.0, 3.5]),
    (4, "reflect", [1.75, 3.5, 5.25], [1.75, 3.5, 4.25]),
    (4, "replicate", [1.625, 3.5, 5.375], [1.625, 3.5, 4.875]),
    (4, "zero", [1.5, 3.5, 4.625], [1.5, 3.5, 2.375]),
    (5, "reflect", [1.75, 3.0, 4.875], [1.75, 3.0, 4.25]),
    (5, "zero", [1.0625, 3.0, 4.5625], [1.0625, 3.0, 3.0625]),
]


@pytest.mark.parametrize("k,mode,even,odd", ONE_D)
def test_worked_1d_examples(k, mode, even, odd):
    layer = adobe.BlurPool1D(1, mode, filt_size=k)
    for length, expected in ((6, even), (5, odd)):
        x = torch.arange(1.0, length + 1, dtype=torch.float64).view(1, 1, -1)
        torch.testing.assert_close(layer(x)[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Against the real packages


SHAPES = [(8, 8), (7, 9), (15, 16), (57, 55)]


def _assert_same(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    expected = theirs(x)
    actual = ours(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", range(1, 8))
def test_antialiased_cnns_package(k):
    aa = pytest.importorskip("antialiased_cnns", reason="antialiased-cnns is an optional test oracle")
    modes = ("reflect", "replicate", "zero")
    for (h, w), mode, stride, pad_off in itertools.product(SHAPES, modes, (1, 2, 3, 5), (0, 1)):  # 5: pad + conv
        x = torch.randn(2, 3, h, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = aa.BlurPool(3, pad_type=mode, filt_size=k, stride=stride, pad_off=pad_off)
        ours = adobe.BlurPool(3, pad_type=mode, filt_size=k, stride=stride, pad_off=pad_off)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        torch.testing.assert_close(ours.filt, theirs.filt, rtol=0, atol=0)
        for attr in ("filt_size", "pad_off", "pad_sizes", "stride", "off", "channels"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert type(ours.pad) is type(theirs.pad)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        _assert_same(ours, theirs, x)
        theirs_1d = aa.BlurPool1D(3, pad_type=mode, filt_size=k, stride=stride, pad_off=pad_off)
        _assert_same(adobe.BlurPool1D(3, mode, k, stride, pad_off), theirs_1d, x[:, :, 0])


@pytest.mark.parametrize("k", range(1, 10))
def test_kornia_package(k):
    kornia = pytest.importorskip("kornia", reason="kornia is a test dependency")
    for (h, w), stride in itertools.product(SHAPES, (1, 2, 3)):
        x = torch.randn(2, 3, h, w)
        _assert_same(kornia_compat.BlurPool2D(k, stride), kornia.filters.BlurPool2D(k, stride), x)
        _assert_same(kornia_compat.BlurPool2D((k, k), stride), kornia.filters.BlurPool2D((k, k), stride), x)
        torch.testing.assert_close(kornia_compat.blur_pool2d(x, k, stride), kornia.filters.blur_pool2d(x, k, stride))
        for max_pool_size in (2, 3):
            _assert_same(
                kornia_compat.MaxBlurPool2D(k, stride, max_pool_size),
                kornia.filters.MaxBlurPool2D(k, stride, max_pool_size),
                x,
            )
        torch.testing.assert_close(
            kornia_compat.max_blur_pool2d(x, k, stride), kornia.filters.max_blur_pool2d(x, k, stride)
        )
    assert kornia_compat.BlurPool2D(k).state_dict().keys() == kornia.filters.BlurPool2D(k).state_dict().keys()


def test_kornia_edge_aware_blur_pool():
    """``EdgeAwareBlurPool2D`` / ``edge_aware_blur_pool2d`` against kornia 0.9: every k (k > 7 and maps narrower than
    the blur window take the reflect-extended path), thresholds, dilations, dtypes; and kornia's argument checks."""
    kornia = pytest.importorskip("kornia", reason="kornia is a test dependency")
    for (h, w), k, threshold, dilation in itertools.product(
        [(3, 3), (3, 7), (5, 4), (9, 12)], range(1, 10), (1.05, 1.25, 2.0), (1, 3, 5)
    ):
        x = (torch.rand(2, 3, h, w, dtype=torch.float64) * 2) ** 3 + 0.01
        x[:, :, h // 2 :] *= 4  # an edge
        expected = kornia.filters.edge_aware_blur_pool2d(x, k, threshold, dilation)
        torch.testing.assert_close(kornia_compat.edge_aware_blur_pool2d(x, k, threshold, dilation), expected)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = ((torch.rand(2, 3, 10, 11) * 2) ** 3 + 0.01).to(dtype)
        ours, theirs = kornia_compat.EdgeAwareBlurPool2D(4, 1.5), kornia.filters.EdgeAwareBlurPool2D(4, 1.5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, epsilon=1e-3), theirs(x, epsilon=1e-3), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), kornia.filters.EdgeAwareBlurPool2D(3, 1.5, 5))
    x = torch.rand(2, 3, 12, 9)
    expected = model(x)
    assert len(convert(model)) == 1 and isinstance(model[1], kornia_compat.EdgeAwareBlurPool2D)
    torch.testing.assert_close(model(x), expected)
    for call, error, match in [
        (lambda: kornia_compat.EdgeAwareBlurPool2D(3, edge_dilation_kernel_size=2), ValueError, "odd"),
        (lambda: kornia_compat.edge_aware_blur_pool2d(torch.rand(1, 1, 5, 5), 3, 1.0), ValueError, "greater than 1"),
        (lambda: kornia_compat.edge_aware_blur_pool2d(torch.rand(1, 1, 2, 5), 3), ValueError, "H, W >= 3"),
        (lambda: kornia_compat.edge_aware_blur_pool2d(torch.ones(1, 1, 5, 5, dtype=torch.long), 3), TypeError, "float"),
        (lambda: kornia_compat.edge_aware_blur_pool2d(torch.rand(1, 1, 5, 5), (3, 5)), ValueError, "kernel shape"),
    ]:
        with pytest.raises(error, match=match):
            call()


def test_kornia_legacy_padding_and_errors():
    # <= 0.8: identical to adobe-zero for odd k, and for even k on even sizes; one short on odd sizes
    x = torch.randn(1, 2, 8, 10)
    for k in range(2, 8):
        torch.testing.assert_close(
            kornia_compat.BlurPool2D(k, legacy_even_padding=True)(x), adobe.BlurPool(2, "zero", k)(x)
        )
    assert kornia_compat.BlurPool2D(4, legacy_even_padding=True)(torch.randn(1, 2, 15, 9)).shape[2:] == (7, 4)
    with pytest.raises(ValueError, match="Invalid kernel shape"):
        kornia_compat.BlurPool2D((3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        kornia_compat.BlurPool2D(3)(torch.ones(1, 1, 8, 8, dtype=torch.int64))
    with pytest.warns(DeprecationWarning, match="ceil_mode"):
        kornia_compat.MaxBlurPool2D(3, ceil_mode=True)
    for stride in ("2", (2,), 2.0, True):
        with pytest.raises(ValueError, match="stride must be an int or a pair"):
            kornia_compat.BlurPool2D(3, stride)


FILTER_BUFFER_LAYERS = {
    "adobe 2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 1), adobe.BlurPool(3, filt_size=5)), "1.filt"),
    "adobe 1d": (lambda: adobe.BlurPool1D(3, filt_size=4), "filt"),
    "adobe stem": (lambda: ktkernels.MaxBlurPool2d(3), "filt"),
    "composer pool": (lambda: composer.BlurPool2d(3), "blur_filter"),
    "composer max": (lambda: composer.BlurMaxPool2d(2), "filt2d"),
    "composer conv": (lambda: composer.BlurConv2d(3, 4, 3, 2), "blur_filter"),
    "ffcv": (lambda: nn.Sequential(ffcv.BlurPoolConv2d(nn.Conv2d(3, 4, 3, 2))), "0.blur_filter"),
}


@pytest.mark.parametrize("name", FILTER_BUFFER_LAYERS)
def test_checkpoint_with_another_filter_fails_to_load(name):
    """The kernels never read the anchors' filter buffers: a checkpoint whose filter is not the binomial one would
    load and silently change the numbers, so it fails like a size mismatch, and the buffer keeps the true filter.
    The true filter loads in any float dtype it may have been saved in."""
    make, key = FILTER_BUFFER_LAYERS[name]
    layer = make()
    state = layer.state_dict()
    true_filter = state[key].clone()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        make().load_state_dict({k: v.to(dtype) if k == key else v for k, v in state.items()}, strict=True)
    other = true_filter.clone()
    other.view(-1)[-1] += 1e-3
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=rf"{re.escape(key)}: .* binomial .* differs from it by up to 0.001"):
            layer.load_state_dict({**state, key: other}, strict=strict)
        assert torch.equal(layer.state_dict()[key], true_filter)
    with pytest.raises(RuntimeError, match=re.escape(key)):
        layer.load_state_dict({**state, key: torch.full_like(true_filter, float("nan"))})
    with pytest.raises(RuntimeError, match=re.escape(key)):
        layer.load_state_dict({**state, key: true_filter.flip(-1) * 2})


def test_kornia_legacy_kernel_is_checked_then_dropped():
    """A 2021-2023 kornia checkpoint with the (k, k) kernel still loads strictly; another kernel fails."""
    layer = kornia_compat.BlurPool2D(4)
    kernel = ktkernels.blurpool.geometry.binomial_filter2d(4)
    layer.load_state_dict({"kernel": kernel}, strict=True)
    with pytest.raises(RuntimeError, match="kernel: BlurPool2D always filters with the normalised binomial filter"):
        layer.load_state_dict({"kernel": torch.ones(4, 4) / 16}, strict=True)
    assert "kernel" not in layer.state_dict()


@pytest.mark.parametrize("k", range(2, 8))
def test_timm_package(k):
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    from timm.layers import BlurPool2d as TimmBlurPool2d
    from timm.layers import create_aa as timm_create_aa

    for (h, w), stride, mode, channels in itertools.product(
        SHAPES, (1, 2, 3), ("reflect", "constant", "replicate", "circular"), (3, None)
    ):
        x = torch.randn(2, 3, h, w)
        theirs = TimmBlurPool2d(channels, filt_size=k, stride=stride, pad_mode=mode)
        ours = timm_compat.BlurPool2d(channels, filt_size=k, stride=stride, pad_mode=mode)
        assert ours.padding == theirs.padding and ours.state_dict().keys() == theirs.state_dict().keys() == set()
        torch.testing.assert_close(ours.filt, theirs.filt, rtol=0, atol=0)
        _assert_same(ours, theirs, x)
    for alias in ("avg", "blur", "blurpc", "blur_pool"):
        ours, theirs = timm_compat.create_aa(alias, channels=3), timm_create_aa(alias, channels=3)
        _assert_same(ours, theirs, torch.randn(1, 3, 9, 8))
    assert (
        isinstance(timm_compat.create_aa(None), nn.Identity)
        and timm_compat.create_aa("blur", enable=False, noop=None) is None
    )
    assert timm.__version__


def test_timm_meta_device_init():
    layer = timm_compat.BlurPool2d(4, device="meta")
    layer = layer.to_empty(device="cpu")
    layer.init_non_persistent_buffers()
    torch.testing.assert_close(layer.filt[0, 0], ktkernels.blurpool.geometry.binomial_filter2d(3))
    with pytest.raises(ValueError, match="filt_size > 1"):
        timm_compat.BlurPool2d(filt_size=1)


def test_adobe_errors_and_aliases():
    with pytest.raises(ValueError, match="built for 8 channels"):
        adobe.BlurPool(8)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown pad mode"):
        adobe.BlurPool(8, pad_type="circular")
    assert adobe.get_pad_layer("refl") is nn.ReflectionPad2d and adobe.get_pad_layer_1d("zero") is nn.ZeroPad1d
    legacy = adobe.Downsample("repl", 3, 2, 4)
    torch.testing.assert_close(legacy(x := torch.randn(1, 4, 9, 9)), adobe.BlurPool(4, "replicate", 3)(x))
    # pad_off=-1 with k=3 pads nothing; pad_off=1 widens the output
    assert adobe.BlurPool(1, filt_size=3, pad_off=-1)(torch.randn(1, 1, 9, 9)).shape[2:] == (4, 4)
    assert adobe.BlurPool(1, filt_size=3, pad_off=1)(torch.randn(1, 1, 9, 9)).shape[2:] == (6, 6)


# ----------------------------------------------------------------------------------------------
# Composer and FFCV, from the reference's descriptions


def test_composer_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size must be >= 1, got 0"):
        composer.BlurMaxPool2d(0)  # the stride defaults to the kernel size: name the kernel size


def test_composer_blurpool_equals_adobe_zero_k3():
    x = torch.randn(2, 4, 13, 10, dtype=torch.float64)
    for stride in (1, 2, 3):
        expected = recipe(x, 3, stride, (1, 1, 1, 1), "zero")
        torch.testing.assert_close(composer.BlurPool2d(4, stride)(x), expected)
        torch.testing.assert_close(composer.BlurPool2d(0, stride)(x), expected)
        torch.testing.assert_close(composer.blur_2d(x, stride=stride), expected)
        torch.testing.assert_close(composer.blur_2d(x, stride=stride, filter=composer._filter3x3()), expected)
    assert set(composer.BlurPool2d(4).state_dict()) == {"blur_filter"}
    assert composer.BlurPool2d(4).blur_filter.shape == (4, 1, 3, 3)
    assert composer.BlurPool2d(0).blur_filter.shape == (1, 1, 3, 3)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [(2, 2, 0, 1), (3, 2, 1, 1), (3, 2, 0, 1), (2, 1, 0, 1), (3, 2, 1, 2), (3, 3, 1, 1)],
)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_composer_blurmaxpool_sizes_and_values(kernel, stride, padding, dilation, ceil_mode):
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    layer = composer.BlurMaxPool2d.from_maxpool2d(pool)
    for size in (112, 56, 9, 10):
        x = torch.randn(1, 2, size, size + 1, dtype=torch.float64)
        y = layer(x)
        assert y.shape == pool(x).shape  # Composer itself is one short with ceil_mode=True
        maxs = F.max_pool2d(x, kernel, 1, padding, dilation)
        extra = stride - 1 if ceil_mode else 0
        expected = recipe(maxs, 3, stride, (1, 1 + extra, 1, 1 + extra), "zero")[:, :, : y.shape[2], : y.shape[3]]
        torch.testing.assert_close(y, expected)
    assert set(layer.state_dict()) == {"filt2d"}


@pytest.mark.parametrize(
    "kernel,stride,padding,ceil_mode",
    [(3, (2, 3), 1, True), ((2, 3), 2, (0, 1), False), (3, (3, 2), (1, 0), True), (2, (1, 2), 0, True)],
)
@pytest.mark.parametrize("size", [(11, 14), (3, 3)])
def test_composer_blurmaxpool_rectangular_pools(kernel, stride, padding, ceil_mode, size):
    """Non-square max pools and strides (no fused op: pad + conv per axis), with ceil_mode's extra zero rows and
    columns differing per axis."""
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    layer = composer.BlurMaxPool2d.from_maxpool2d(pool)
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    y = layer(x)
    assert y.shape == pool(x).shape
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    extra_h, extra_w = (sh - 1, sw - 1) if ceil_mode else (0, 0)
    maxs = F.max_pool2d(x, kernel, 1, padding)
    expected = recipe(maxs, 3, (sh, sw), (1, 1 + extra_w, 1, 1 + extra_h), "zero")[:, :, : y.shape[2], : y.shape[3]]
    torch.testing.assert_close(y, expected)


def test_max_then_blur_runs_its_children_when_the_pool_is_not_the_fused_one():
    """``MaxThenBlur`` fuses only a stride-1 max pool of kernel 2 (pad 0) or 3 (pad 1): a strided one, a square one
    of another size, or one changed after construction runs the two children, with their values."""
    from ktkernels.blurpool.modules import MaxThenBlur

    x = torch.randn(2, 4, 17, 15, dtype=torch.float64)
    for pool in (nn.MaxPool2d(2, stride=2), nn.MaxPool2d((2, 3), stride=1), nn.MaxPool2d(3, 1, padding=(1, 0))):
        layer = MaxThenBlur(pool, ktkernels.BlurPool2d(4))
        torch.testing.assert_close(layer(x), layer[1](pool(x)), msg=str(pool))
    layer = MaxThenBlur(nn.MaxPool2d(2, stride=1), ktkernels.BlurPool2d(4))
    layer[0].stride = 2  # live, as in torch's own layers
    torch.testing.assert_close(layer(x), layer[1](F.max_pool2d(x, 2, 2)))


def test_convert_reads_each_anchor_setting(monkeypatch):
    """antialiased-cnns' zero and replicate pad types (kept only as the pad module's class) and kornia's version
    boundary (0.8.x pads (k-1)//2 on both sides, 0.9 does not) survive ``convert``."""
    aa = pytest.importorskip("antialiased_cnns")
    kornia = pytest.importorskip("kornia")
    x = torch.randn(2, 3, 11, 10)
    for pad_type in ("zero", "repl", "refl"):
        model = nn.Sequential(aa.BlurPool(3, pad_type=pad_type, filt_size=4)).eval()
        expected = model(x)
        convert(model)
        assert type(model[0]).__module__.startswith("ktkernels."), pad_type
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6, msg=pad_type)
    for version, legacy in (("0.8.1", True), ("0.8.0", True), ("0.9.0", False), ("1", False)):
        monkeypatch.setattr(kornia, "__version__", version)
        model = nn.Sequential(kornia.filters.BlurPool2D(4))
        convert(model)
        assert model[0].legacy_even_padding == legacy, version


def test_composer_apply_blurpool_takes_convs_strided_on_one_axis():
    """Composer replaces a conv whose stride exceeds 1 on either axis."""
    model = nn.Sequential(nn.Conv2d(16, 8, 3, stride=(1, 2), padding=1), nn.Conv2d(8, 8, 3, stride=(2, 1)))
    composer.apply_blurpool(model, min_channels=1)
    assert all(isinstance(m, composer.BlurConv2d) for m in model), model


def test_composer_ceil_mode_examples_from_the_reference():
    assert composer.BlurMaxPool2d(3, 2, 0, ceil_mode=True)(torch.randn(1, 1, 112, 112)).shape[2] == 56
    assert composer.BlurMaxPool2d(3, 2, 1, ceil_mode=True)(torch.randn(1, 1, 56, 56)).shape[2] == 29


@pytest.mark.parametrize("kernel,stride,padding", [(1, 2, 0), (3, 2, 1), (1, 2, 1), (3, 1, 1), (5, 2, 2)])
@pytest.mark.parametrize("blur_first", [True, False])
def test_composer_blurconv(kernel, stride, padding, blur_first):
    conv = nn.Conv2d(16, 8, kernel, stride, padding, bias=True).double()
    layer = composer.BlurConv2d.from_conv2d(conv, blur_first=blur_first)
    x = torch.randn(2, 16, 11, 12, dtype=torch.float64)
    if blur_first:
        expected = conv(recipe(x, 3, 1, (1, 1, 1, 1), "zero"))
    else:
        expected = recipe(F.conv2d(x, conv.weight, conv.bias, 1, padding), 3, stride, (1, 1, 1, 1), "zero")
    torch.testing.assert_close(layer(x), expected)  # the 1x1 rewrite is exact, not approximate
    assert layer.conv._already_blurpooled and layer.conv.weight.dtype == torch.float64
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias", "blur_filter"}
    assert layer._pool_rewrite == (blur_first and kernel == 1 and padding == 0 and stride > 1)
    with pytest.raises(ValueError, match="explicit stride"):
        composer.BlurConv2d(4, 4, 3, stride=None, blur_first=True)


def test_composer_apply_blurpool_on_resnet50():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50()
    params = {name: p for name, p in model.named_parameters()}
    composer.apply_blurpool(model)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("BlurMaxPool2d") == 1 and kinds.count("BlurConv2d") == 6  # Composer's documented result
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}  # optimizers keep working
    before = model.state_dict().keys()
    composer.apply_blurpool(model)
    assert model.state_dict().keys() == before  # idempotent
    assert [type(m).__name__ for m in model.modules()] == kinds
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


class _StandardisedConv2d(nn.Conv2d):
    """A conv subclass with its own forward (weight standardisation)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("blur_first", [True, False])
def test_composer_surgery_keeps_the_conv_it_wraps(blur_first):
    """apply_blurpool wraps each strided conv itself: a subclass keeps its forward (weight standardisation, as in
    timm's StdConv2d), a weight-normed conv its parametrization, and the numbers are those of blur-then-conv (or
    conv-then-blur); Composer's own copy into a plain Conv2d changed them. A second call changes nothing."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), _StandardisedConv2d(16, 16, 3, 2, 1), weight_norm(nn.Conv2d(16, 8, 3, 2, 1))
    ).double()
    convs, params = list(model)[1:], {id(p) for p in model.parameters()}
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    blur = lambda y, s: recipe(y, 3, s, (1, 1, 1, 1), "zero")  # noqa: E731  Composer's 3x3 zero-padded blur
    y = model[0](x)
    for conv in convs:
        stride = conv.stride[0]
        if blur_first:
            y = conv(blur(y, 1))
        else:
            conv.stride = (1, 1)
            y = blur(conv(y), stride)
            conv.stride = (stride, stride)
    composer.apply_blurpool(model, blur_first=blur_first)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BlurConv2d", "BlurConv2d"]
    assert [m.conv for m in list(model)[1:]] == convs and {id(p) for p in model.parameters()} == params
    torch.testing.assert_close(model(x), y)
    kinds = [type(m).__name__ for m in model.modules()]
    composer.apply_blurpool(model, blur_first=blur_first)
    assert [type(m).__name__ for m in model.modules()] == kinds


@pytest.mark.parametrize("wrap", ["ffcv", "composer"])
def test_strided_1x1_shortcut_keeps_the_wrapped_conv_forward_and_hooks(wrap):
    """The strided 1x1 rewrite (blur-pool, then the conv at stride 1) skips ``conv.forward``: it must not run for a
    conv subclass or a conv with hooks (weight_norm's pre-hook, pruning, user hooks), whose forward counts."""
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)

    def wrapped(conv):
        if wrap == "ffcv":
            return ffcv.BlurPoolConv2d(conv)
        layer = composer.BlurConv2d(16, 8, 1, 2)
        layer.adopt_conv(conv)
        return layer

    subclass = _StandardisedConv2d(16, 8, 1, 2).double()
    torch.testing.assert_close(wrapped(subclass)(x), subclass(recipe(x, 3, 1, (1, 1, 1, 1), "zero")))
    hooked, calls = nn.Conv2d(16, 8, 1, 2).double(), []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    wrapped(hooked)(x)
    assert calls == [1]
    normed = wrapped(torch.nn.utils.weight_norm(nn.Conv2d(16, 8, 1, 2).double()))
    for _ in range(2):  # the pre-hook recomputes the weight each step; skipping it broke the second backward
        normed(x).sum().backward()
    plain = nn.Conv2d(16, 8, 1, 2).double()
    torch.testing.assert_close(wrapped(plain)(x), plain(recipe(x, 3, 1, (1, 1, 1, 1), "zero")))


class _LoraConv(nn.Module):
    """A LoRA-style wrapper as PEFT tools swap in after surgery: the conv's attributes, plus a delta in forward."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.base, self.weight, self.bias, self.groups = conv, conv.weight, conv.bias, conv.groups
        self.stride, self.kernel_size, self.padding, self.in_channels = conv.stride, (1, 1), (0, 0), conv.in_channels

    def forward(self, x):
        return self.base(x) + 0.5


@pytest.mark.parametrize("wrap", ["ffcv", "composer"])
def test_strided_1x1_shortcut_follows_the_conv_after_construction(wrap):
    """Whether the 1x1 rewrite applies is decided on every call: a conv swapped in after construction (another
    kernel, a LoRA-style wrapper) or changed in place (stride) runs as the anchor runs it, blur at stride 1 then
    ``conv``, never at the stride the rewrite was built for."""
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)
    for replace in (
        lambda layer: setattr(layer, "conv", nn.Conv2d(16, 8, 3, 2, 1).double()),
        lambda layer: setattr(layer, "conv", _LoraConv(layer.conv)),
        lambda layer: setattr(layer.conv, "stride", (1, 1)),
        lambda layer: setattr(layer.conv, "stride", (3, 3)),  # still a rewrite, but not at the built stride
        lambda layer: setattr(layer, "conv", nn.Conv2d(16, 8, 1, 3).double()),  # a new rewrite, at its own stride
    ):
        conv = nn.Conv2d(16, 8, 1, 2).double()
        layer = ffcv.BlurPoolConv2d(conv) if wrap == "ffcv" else composer.BlurConv2d.from_conv2d(conv)
        replace(layer)
        torch.testing.assert_close(layer(x), layer.conv(recipe(x, 3, 1, (1, 1, 1, 1), "zero")))


def test_composer_attributes_are_live():
    """Composer's forwards read their attributes on every call (``blur_2d(..., stride=self.stride)``): setting one
    takes effect, as it does on the other anchors' layers."""
    x = torch.randn(1, 4, 12, 11, dtype=torch.float64)
    layer = composer.BlurPool2d(4)
    layer.stride = 1
    torch.testing.assert_close(layer(x), recipe(x, 3, 1, (1, 1, 1, 1), "zero"))
    layer.channels = 5
    with pytest.raises(ValueError, match="built for 5 channels"):
        layer(x)
    pool = composer.BlurMaxPool2d(2, 2)
    for name, value in (("stride", 1), ("kernel_size", 3), ("padding", 1), ("ceil_mode", True), ("stride", 2)):
        setattr(pool, name, value)
        expected = composer.BlurMaxPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
        torch.testing.assert_close(pool(x), expected(x), msg=name)
        torch_pool = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
        assert pool(x).shape == torch_pool(x).shape, name
    conv = composer.BlurConv2d(4, 4, 3, 1, 1, blur_first=False).double()
    conv.blur_stride = 2
    torch.testing.assert_close(conv(x), recipe(conv.conv(x), 3, 2, (1, 1, 1, 1), "zero"))
    conv.blur_first = True
    torch.testing.assert_close(conv(x), conv.conv(recipe(x, 3, 1, (1, 1, 1, 1), "zero")))


def test_composer_blurmax_pool2d_honours_ceil_mode_with_a_filter_too():
    """A custom ``filter`` runs max pool + conv; with ceil_mode it gives the size and values of the fused path."""
    x = torch.randn(1, 2, 12, 13, dtype=torch.float64)
    for kernel, stride, padding in ((3, 2, 0), (2, 2, 0), (3, 2, 1), (3, 3, 1)):
        fused = composer.blurmax_pool2d(x, kernel, stride, padding, 1, True)
        filtered = composer.blurmax_pool2d(x, kernel, stride, padding, 1, True, filter=composer._filter3x3().double())
        assert fused.shape == nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)(x).shape
        torch.testing.assert_close(filtered, fused)


def test_numpy_integers_are_taken():
    """numpy integers, as ``nn.MaxPool2d`` and the anchors take them (kornia's stride, timm's filt_size)."""
    x = torch.randn(1, 16, 9, 8)
    i = np.int64
    pairs = [
        (kornia_compat.BlurPool2D(3, i(2)), kornia_compat.BlurPool2D(3, 2)),
        (timm_compat.BlurPool2d(16, i(3)), timm_compat.BlurPool2d(16, 3)),
        (composer.BlurPool2d(16, i(2)), composer.BlurPool2d(16, 2)),
        (composer.BlurMaxPool2d(i(3), (i(2), 2), i(1)), composer.BlurMaxPool2d(3, 2, 1)),
        (composer.apply_blurpool(nn.Sequential(nn.MaxPool2d(i(3), 2, 1))), composer.BlurMaxPool2d(3, 2, 1)),
    ]
    for ours, plain in pairs:
        torch.testing.assert_close(ours(x), plain(x))
    for stride in (2.0, (2,), "2"):
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            composer.BlurPool2d(16, stride)


def test_ffcv_blurpoolconv():
    for kernel, stride, padding in [(3, 2, 1), (1, 2, 0), (3, 1, 1)]:
        conv = nn.Conv2d(16, 4, kernel, stride, padding).double()
        layer = ffcv.BlurPoolConv2d(conv)
        x = torch.randn(1, 16, 9, 10, dtype=torch.float64)
        torch.testing.assert_close(layer(x), conv(recipe(x, 3, 1, (1, 1, 1, 1), "zero")))
        assert set(layer.state_dict()) == {"conv.weight", "conv.bias", "blur_filter"}
        assert layer.blur_filter.shape == (16, 1, 3, 3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2), nn.Conv2d(16, 16, 3, 2), nn.Conv2d(16, 16, 3, 1))
    ffcv.apply_blurpool(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BlurPoolConv2d", "Conv2d"]
    ffcv.apply_blurpool(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BlurPoolConv2d", "Conv2d"]


# ----------------------------------------------------------------------------------------------
# convert()


def _fake_package_module(name: str, classes: dict[str, type]) -> None:
    """Register stand-ins for a package that is not installed (Composer, an FFCV training script)."""
    module = types.ModuleType(name)
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = name, cls_name, cls_name
        setattr(module, cls_name, cls)
    sys.modules.setdefault(name, module)


class _ComposerBlurPool2d(nn.Module):  # Composer's recipe, from the reference's description
    def __init__(self, channels=0, stride=2, padding=1):
        super().__init__()
        self.channels, self.stride, self.padding = channels, stride, padding
        self.register_buffer("blur_filter", composer._filter3x3(max(channels, 1)))

    def forward(self, x):
        return F.conv2d(
            x, self.blur_filter.expand(x.shape[1], 1, 3, 3), stride=self.stride, padding=1, groups=x.shape[1]
        )


class _ComposerBlurConv2d(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.blur_first = conv, True
        self.register_buffer("blur_filter", composer._filter3x3(conv.in_channels))

    def forward(self, x):
        return self.conv(F.conv2d(x, self.blur_filter, padding=1, groups=x.shape[1]))


class _ComposerBlurMaxPool2d(nn.Module):
    def __init__(self, kernel_size, stride, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode = (
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
        )
        self.register_buffer("filt2d", composer._filter3x3())

    def forward(self, x):
        m = F.max_pool2d(x, self.kernel_size, 1, self.padding, self.dilation)
        return F.conv2d(m, self.filt2d.expand(x.shape[1], 1, 3, 3), stride=self.stride, padding=1, groups=x.shape[1])


class _FfcvBlurPoolConv2d(_ComposerBlurConv2d):
    pass


def test_convert_every_third_party_layer():
    aa = pytest.importorskip("antialiased_cnns")
    kornia = pytest.importorskip("kornia")
    timm = pytest.importorskip("timm")
    _fake_package_module(
        "composer.algorithms.blurpool.blurpool_layers",
        {"BlurPool2d": _ComposerBlurPool2d, "BlurConv2d": _ComposerBlurConv2d, "BlurMaxPool2d": _ComposerBlurMaxPool2d},
    )
    _fake_package_module("train_imagenet", {"BlurPoolConv2d": _FfcvBlurPoolConv2d})
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        aa.BlurPool(16, filt_size=4),
        kornia.filters.BlurPool2D(3),
        nn.Sequential(kornia.filters.MaxBlurPool2D(4), timm.layers.BlurPool2d(16, filt_size=3)),
        _ComposerBlurPool2d(16, 1),
        _ComposerBlurMaxPool2d(3, 1, 1),
        _ComposerBlurConv2d(nn.Conv2d(16, 16, 1, 2)),
        _FfcvBlurPoolConv2d(nn.Conv2d(16, 8, 3, 1, 1)),
        timm.layers.BlurPool2d(None, filt_size=4, pad_mode="constant", stride=1),
    ).eval()
    x = torch.randn(2, 3, 64, 48)
    expected = model(x)
    keys = model.state_dict().keys()
    report = convert(model)
    assert len(report) == 9, str(report)
    assert all(new.startswith("ktkernels.compat.") for _, _, new in report.replaced)
    assert not any(
        type(m).__module__.split(".")[0] in ("antialiased_cnns", "kornia", "timm", "composer", "train_imagenet")
        for m in model.modules()
    )
    assert model.state_dict().keys() == keys
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert len(convert(model)) == 0  # nothing left to convert
    _check_compilers_and_exporters(model, x)


def _check_compilers_and_exporters(model: nn.Module, x: torch.Tensor, compile: bool = True) -> None:
    """compile(fullgraph, dynamic batch), export (dynamic batch), script and FX all give the eager values."""
    x_other = torch.cat([x, x[:1]])  # another batch size
    expected, expected_other = model(x), model(x_other)
    if compile:
        torch._dynamo.reset()  # each layer configuration is a recompile of the same forward: start from zero
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x_other), expected_other, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    torch.testing.assert_close(exported(x_other), expected_other, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected, rtol=1e-5, atol=1e-5)


class _ComposerBlurConvAfter(nn.Module):
    """Composer's BlurConv2d(blur_first=False): the conv at stride 1, then the blur at ``blur_stride``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding):
        super().__init__()
        self.blur_first, self.blur_stride = False, stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding)
        self.register_buffer("blur_filter", composer._filter3x3(out_channels))

    def forward(self, x):
        y = self.conv(x)
        return F.conv2d(y, self.blur_filter, stride=self.blur_stride, padding=1, groups=y.shape[1])


def test_convert_keeps_composer_sizes_and_kornia_versions(monkeypatch):
    """Composer's BlurConv2d(blur_first=False) blurs at ``blur_stride`` (its conv runs at stride 1); Composer's
    BlurMaxPool2d ignores ceil_mode (ktkernels' own honours it); a kornia <= 0.8 layer pads (k-1)//2 on both
    sides. Converting keeps every output size and value."""
    kornia = pytest.importorskip("kornia")
    _fake_package_module(
        "composer.algorithms.blurpool.blurpool_layers",
        {"BlurConv2d": _ComposerBlurConvAfter, "BlurMaxPool2d": _ComposerBlurMaxPool2d},
    )
    model = nn.Sequential(_ComposerBlurConvAfter(3, 8, 3, 2, 1), _ComposerBlurMaxPool2d(3, 2, 0, 1, True)).eval()
    x = torch.randn(2, 3, 47, 45)
    expected = model(x)
    assert len(convert(model)) == 2
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kornia, "__version__", "0.7.2")
    model = nn.Sequential(kornia.filters.BlurPool2D(4))
    convert(model)
    x = torch.randn(1, 2, 9, 9)
    assert model[0].legacy_even_padding
    torch.testing.assert_close(model(x), recipe(x, 4, 2, (1, 1, 1, 1), "zero"))  # kornia <= 0.8: 4x4, not 5x5


def test_convert_is_all_or_nothing():
    """A layer that cannot be converted leaves the whole model as it was (no half-converted model)."""
    aa = pytest.importorskip("antialiased_cnns")
    timm = pytest.importorskip("timm")
    bad = timm.layers.BlurPool2d(4)
    bad.filt_size = 1  # timm needs filt_size > 1: the replacement refuses it
    model = nn.Sequential(aa.BlurPool(4), bad)
    with pytest.raises(ValueError, match="filt_size"):
        convert(model)
    assert [type(m).__module__.split(".")[0] for m in model] == ["antialiased_cnns", "timm"]


def test_convert_keeps_shared_layers_shared_and_their_hooks():
    """One layer used twice gets one replacement; forward, pre-forward and full backward hooks registered on it
    keep firing after convert, and their handles still remove them."""
    aa = pytest.importorskip("antialiased_cnns")
    blur = aa.BlurPool(4, filt_size=3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), blur, nn.Sequential(blur))
    calls = []
    handles = [
        blur.register_forward_pre_hook(lambda m, args: calls.append("pre")),
        blur.register_forward_hook(lambda m, args, kwargs, out: calls.append("post"), with_kwargs=True),
        blur.register_full_backward_hook(lambda m, gin, gout: calls.append("backward")),
    ]
    x = torch.randn(1, 3, 20, 20)
    model(x).sum().backward()
    expected, calls[:] = list(calls), []
    report = convert(model)
    assert model[1] is model[2][0] and isinstance(model[1], adobe.BlurPool)
    assert [name for name, _, _ in report.replaced] == ["1", "2.0"]
    model(x).sum().backward()
    assert calls == expected == ["pre", "post", "pre", "post", "backward", "backward"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(x).sum().backward()
    assert calls == []


def test_convert_refuses_a_bare_layer():
    kornia = pytest.importorskip("kornia")
    with pytest.raises(TypeError, match="wrap"):
        convert(kornia.filters.BlurPool2D(3))


def test_convert_keeps_half_buffers():
    aa = pytest.importorskip("antialiased_cnns")
    model = nn.Sequential(aa.BlurPool(4)).half()
    convert(model)
    assert model[0].filt.dtype == torch.float16 and isinstance(model[0], adobe.BlurPool)


# ----------------------------------------------------------------------------------------------
# Compilers and exporters: every layer flavour


def _layers() -> dict[str, nn.Module]:
    return {
        "ktkernels.BlurPool2d": ktkernels.BlurPool2d(8),
        "ktkernels.MaxBlurPool2d": ktkernels.MaxBlurPool2d(8, filt_size=3),
        "MaxThenBlur": ktkernels.blurpool.MaxThenBlur(nn.MaxPool2d(2, 1), ktkernels.BlurPool2d(8)),
        "adobe.BlurPool": adobe.BlurPool(8, "replicate", 5),
        "kornia.MaxBlurPool2D": kornia_compat.MaxBlurPool2D(4),
        "kornia.BlurPool2D k9": kornia_compat.BlurPool2D(9),
        "timm.BlurPool2d": timm_compat.BlurPool2d(None, filt_size=4),
        "composer.BlurMaxPool2d": composer.BlurMaxPool2d(3, 2, 1, ceil_mode=True),
        "composer.BlurConv2d": composer.BlurConv2d.from_conv2d(nn.Conv2d(8, 4, 1, 2)),
        "ffcv.BlurPoolConv2d": ffcv.BlurPoolConv2d(nn.Conv2d(8, 4, 3, 2, 1)),
    }


LAYER_NAMES = list(_layers())


def _example(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 8, 13, 16)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_script_and_fx_take_the_reference_path(name):
    layer = _layers()[name].eval()
    x = _example()
    expected = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-6)
    traced = torch.fx.symbolic_trace(layer)
    assert "ktkernels" not in traced.code
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
    x3 = _example(3)
    torch.testing.assert_close(traced(x3), layer(x3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_compile_and_export_with_dynamic_batch(name):
    layer = _layers()[name].eval()
    torch._dynamo.reset()  # each layer configuration is a recompile of the same forward: start from zero
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = _example(batch)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(layer, (_example(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = _example(5)
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=1e-5, atol=1e-6)


def test_export_keeps_the_fused_op():
    exported = torch.export.export(ktkernels.BlurPool2d(8), (_example(),))
    assert "ktkernels.blur_pool2d" in str(exported.graph)


def test_onnx_export_roundtrip(tmp_path):
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ktkernels.export import export_onnx

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ktkernels.MaxBlurPool2d(8),
        adobe.BlurPool(8, filt_size=3),
        composer.BlurConv2d.from_conv2d(nn.Conv2d(8, 8, 1, 2)),
        timm_compat.BlurPool2d(8),
    ).eval()
    for zero_pad in (False, True):
        path = tmp_path / f"model_{zero_pad}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, (torch.randn(2, 3, 64, 64),), path, zero_pad=zero_pad)
        graph = onnx.load(path).graph
        ops = [node.op_type for node in graph.node]
        assert "Conv" in ops and "MaxPool" in ops and ("Pad" in ops) != zero_pad  # zero pads fold into Conv
        pad_modes = {
            attr.s.decode()
            for node in graph.node
            if node.op_type == "Pad"
            for attr in node.attribute
            if attr.name == "mode"
        }
        assert ("reflect" in pad_modes) != zero_pad  # zero pads are Pad's default mode (or folded into Conv)
        groups = [
            attr.i for node in graph.node if node.op_type == "Conv" for attr in node.attribute if attr.name == "group"
        ]
        assert 8 in groups  # constant groups: the depthwise blur
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = torch.randn(5, 3, 64, 64)  # another batch size: the batch axis is dynamic
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with decomposed(zero_pad=zero_pad):
            expected = model(x)
        torch.testing.assert_close(torch.from_numpy(y), expected.detach(), rtol=1e-4, atol=1e-5)
        if not zero_pad:
            torch.testing.assert_close(expected, model(x).detach(), rtol=1e-5, atol=1e-6)


class _FunctionalBlurs(nn.Module):
    """The functional API inside a model: each call must become pad + conv (+ max pool) in ONNX as the layers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ktkernels.max_blur_pool2d(x, filt_size=3)
        y = ktkernels.blur_pool2d(y, filt_size=5, stride=1, pad_mode="replicate")
        return ktkernels.blur_pool1d(y.flatten(2), filt_size=2, pad_mode="zero")


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export-based", "TorchScript-based"])
def test_plain_torch_onnx_export(tmp_path, dynamo):
    """``torch.onnx.export`` itself, not only ``export_onnx``, writes the decomposition: ONNX runtimes do not know
    the ktkernels ops. Layers (fused and not), compat layers and the functional API, under both exporters; the
    TorchScript-based one must not warn about the checks it traces."""
    if dynamo:
        pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ktkernels.MaxBlurPool2d(8),
        adobe.BlurPool(8, filt_size=3),
        kornia_compat.MaxBlurPool2D(3),
        composer.BlurConv2d.from_conv2d(nn.Conv2d(8, 8, 1, 2)),
        timm_compat.BlurPool2d(8),
        kornia_compat.BlurPool2D(3, stride=(2, 1)),  # no fused op: the layer's own decomposition
        _FunctionalBlurs(),
    ).eval()
    x = torch.randn(2, 3, 256, 192)  # six halvings, then the functional blurs
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (x,), path, dynamo=dynamo)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    graph = onnx.load(path).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "an op ONNX runtimes do not know"
    assert {"Conv", "MaxPool", "Pad"} <= {node.op_type for node in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_onnx_export_of_the_edge_aware_blur(tmp_path):
    """kornia's ``EdgeAwareBlurPool2D`` blurs through the fused op: under ``decomposed()`` (and so in ONNX) it must
    take pad + conv like every layer, or the exporter meets a ktkernels op it cannot write. The example input is a
    bare tensor, as ``torch.onnx.export`` accepts."""
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from ktkernels.export import export_onnx

    for k in (3, 4):  # the fused path (k <= 7, maps wider than k // 2)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), kornia_compat.EdgeAwareBlurPool2D(k)).eval()
        x = torch.rand(2, 3, 16, 16)
        with decomposed():
            exported = torch.export.export(model, (x,))
        assert not [node for node in exported.graph.nodes if "ktkernels" in str(node.target)]
        path = tmp_path / f"edge_{k}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, x, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = torch.rand(3, 3, 16, 16)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_antialiased_resnet_under_compilers_and_exporters():
    torchvision = pytest.importorskip("torchvision")
    model = ktkernels.antialias(torchvision.models.resnet18(num_classes=10)).eval()
    # Inductor on a whole ResNet takes minutes on 2 cores; every layer it contains is compiled above.
    _check_compilers_and_exporters(model, torch.randn(2, 3, 64, 64), compile=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_gpu_match_the_cpu(name, dtype):
    layer = _layers()[name].eval()
    x = _example(4).to(memory_format=torch.channels_last)
    expected = layer(x)
    gpu = layer.to(device="cuda", dtype=dtype)
    actual = gpu(x.to(device="cuda", dtype=dtype))
    assert actual.is_contiguous(memory_format=torch.channels_last) or actual.dim() != 4 or "Conv" in name
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual.float().cpu(), expected, rtol=tol, atol=tol)
