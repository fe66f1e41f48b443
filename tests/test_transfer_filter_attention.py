"""Filter attention (Mo, Cheng & Fang 2019): wrapping, the three scaling strategies against a float64 reference
(values, gradients, gradcheck), state dicts, penalties, ranking, pruning, folding, training phases, parameter
counts of torchvision's ResNets (the authors' logged ResNet-50 counts), channels_last, torch.compile, errors."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktkernels.transfer.filter_attention import (
    FilterAttentionConv2d,
    FilterRanking,
    add_filter_attention,
    apply_phase,
    attention_phases,
    filter_attention_layers,
    filter_attention_penalty,
    fold_filter_attention,
    prune_filters,
    rank_filters,
)

STRATEGIES = ("weight", "output", "auto")


class TinyResNet(nn.Module):
    """Stem conv + BN, a grouped conv, a dilated 'same' conv, a biased reflect-padded strided conv, a 1x1
    downsample (conv + BN) and the classifier ``fc``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding="same", dilation=2, bias=False)
        self.conv4 = nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="reflect", bias=True)
        self.downsample = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        y = self.conv4(F.relu(self.conv3(y)))
        y = F.relu(y + self.downsample(x))
        return self.fc(y.mean((2, 3)))


CONV_NAMES = ["conv1", "conv2", "conv3", "conv4", "downsample.0"]
BN_NAMES = ["bn1", "bn2", "downsample.1"]

# Convolution configurations for the single-layer tests: (Conv2d kwargs, input shape).
CONFIGS = [
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 7, 6)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2, bias=False), (2, 4, 7, 8)),
    (dict(in_channels=4, out_channels=5, kernel_size=(3, 3), padding="same", dilation=(2, 1)), (1, 4, 6, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="reflect"), (2, 3, 5, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="circular"), (2, 3, 5, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=1, stride=(2, 1), padding="valid"), (3, 3, 5, 5)),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, padding_mode="replicate"), (2, 4, 5, 4)),
]
CONFIG_IDS = ["bias", "grouped-strided", "same-dilated", "reflect", "circular", "valid-1x1", "depthwise-replicate"]


def layer_from(kwargs: dict, shape: str = "out", strategy: str = "auto", dtype=torch.float64) -> FilterAttentionConv2d:
    conv = nn.Conv2d(**kwargs, dtype=dtype)
    return FilterAttentionConv2d.from_conv(conv, shape, strategy)


def randomise(layer: FilterAttentionConv2d) -> None:
    with torch.no_grad():
        layer.attn.copy_(torch.randn_like(layer.attn) + 1)
        if layer.bias is not None:
            layer.bias.normal_()


def reference(layer: FilterAttentionConv2d, x, weight, attn, bias):
    """``F.conv2d`` on the explicitly scaled weight, with the same padding handling as nn.Conv2d."""
    scale = attn if layer.filter_mask is None else attn * layer.filter_mask.to(attn.dtype)
    w = weight * (scale[:, None, None, None] if scale.dim() == 1 else scale[:, :, None, None])
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return F.conv2d(x, w, bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def grads(layer: FilterAttentionConv2d, x: torch.Tensor, upstream: torch.Tensor):
    """Output and gradients with respect to (x, weight, bias, attn) of ``sum(layer(x) * upstream)``."""
    x = x.detach().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    (y * upstream).sum().backward()
    bias_grad = None if layer.bias is None else layer.bias.grad.clone()
    return y.detach(), x.grad, layer.weight.grad.clone(), bias_grad, layer.attn.grad.clone()


# ----------------------------------------------------------------------------------------------
# The wrapped convolution


def test_from_conv_keeps_parameters_hyperparameters_and_is_identity_at_init():
    net = TinyResNet().eval()
    x = torch.randn(2, 3, 12, 12)
    before = net(x)
    params = {n: p for n, p in net.named_parameters()}
    keys = set(net.state_dict())
    attns = add_filter_attention(net)
    assert [tuple(a.shape) for a in attns] == [(8,), (8,), (8,), (12,), (12,)]
    assert all(torch.equal(a, torch.ones_like(a)) and a.requires_grad for a in attns)
    layers = filter_attention_layers(net)
    assert list(layers) == CONV_NAMES
    assert [m.attn for m in layers.values()] == attns
    for name, p in net.named_parameters():  # the very same Parameter objects
        if not name.endswith(".attn"):
            assert p is params[name]
    assert set(net.state_dict()) == keys | {f"{n}.attn" for n in CONV_NAMES}
    assert net.conv3.padding == "same" and net.conv3.dilation == (2, 2)
    assert net.conv4.padding_mode == "reflect" and net.conv2.groups == 2 and net.conv4.stride == (2, 2)
    for strategy in STRATEGIES:
        for layer in layers.values():
            layer.strategy = strategy
        assert torch.equal(net(x), before), strategy  # W ⊙ 1 == W and y · 1 + b == y + b exactly


@pytest.mark.parametrize("shape", ["out", "out_in"])
def test_from_conv_device_dtype_and_repr(shape):
    conv = nn.Conv2d(4, 6, 3, groups=2, dtype=torch.float64).train(False)
    layer = FilterAttentionConv2d.from_conv(conv, shape)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert layer.attn.dtype == torch.float64 and layer.attn.device == conv.weight.device
    assert layer.attn.shape == ((6,) if shape == "out" else (6, 2))
    assert not layer.training and layer.filter_mask is None
    assert f"attn_shape={shape}" in repr(layer) and "strategy=auto" in repr(layer)
    assert FilterAttentionConv2d.from_conv(nn.Conv2d(4, 6, 3), "full").attn_shape == "out_in"
    direct = FilterAttentionConv2d(4, 6, 3, groups=2, shape=shape)
    assert direct.attn.shape == layer.attn.shape and torch.equal(direct.attn, torch.ones_like(direct.attn))
    with torch.no_grad():
        direct.attn.fill_(3)
    direct.reset_parameters()
    assert torch.equal(direct.attn, torch.ones_like(direct.attn))


@pytest.mark.parametrize("kwargs,in_shape", CONFIGS, ids=CONFIG_IDS)
def test_output_spatial_size_matches_the_convolution(kwargs, in_shape):
    layer = layer_from(kwargs, strategy="weight")
    y = layer(torch.randn(in_shape, dtype=torch.float64))
    assert layer.output_spatial_size(in_shape) == tuple(y.shape[-2:])
    assert layer.output_spatial_size(in_shape[1:]) == tuple(y.shape[-2:])


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("kwargs,in_shape", CONFIGS, ids=CONFIG_IDS)
def test_strategies_match_the_float64_reference(kwargs, in_shape, masked):
    layer = layer_from(kwargs)
    randomise(layer)
    if masked:
        prune_filters(nn.Sequential(layer), 0.4)
        assert (~layer.filter_mask).sum() == int(0.4 * layer.out_channels)
    x = torch.randn(in_shape, dtype=torch.float64)
    out_shape = layer(x).shape
    upstream = torch.randn(out_shape, dtype=torch.float64)

    # Reference: autograd through F.conv2d on the explicitly scaled weight.
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.attn)]
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    y_ref = reference(layer, leaves[0], leaves[1], leaves[2], bias)
    (y_ref * upstream).sum().backward()
    expected = (y_ref.detach(), leaves[0].grad, leaves[1].grad, None if bias is None else bias.grad, leaves[2].grad)

    for strategy in STRATEGIES:
        layer.strategy = strategy
        got = grads(layer, x, upstream)
        for g, e, what in zip(got, expected, ("y", "dx", "dW", "db", "dA"), strict=True):
            if e is None:
                assert g is None
            else:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"{strategy} {what}")
        if masked:
            assert torch.all(got[4][~layer.filter_mask] == 0)


def test_hand_computed_attention_gradient():
    """dL/dA_o = Σ_{i,kh,kw} W_o ⊙ dL/dW'_o, dL/dW = A ⊙ dL/dW'."""
    layer = layer_from(dict(in_channels=3, out_channels=4, kernel_size=3, padding=1))
    randomise(layer)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    upstream = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w_scaled = (layer.weight * layer.attn[:, None, None, None]).detach().requires_grad_()
    (F.conv2d(x, w_scaled, layer.bias.detach(), padding=1) * upstream).sum().backward()
    d_attn = (layer.weight.detach() * w_scaled.grad).sum((1, 2, 3))
    d_weight = layer.attn.detach()[:, None, None, None] * w_scaled.grad
    for strategy in STRATEGIES:
        layer.strategy = strategy
        _, _, dw, _, da = grads(layer, x, upstream)
        torch.testing.assert_close(da, d_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, d_weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,strategy", [("out", "weight"), ("out", "output"), ("out_in", "weight")])
def test_gradcheck(shape, strategy):
    layer = layer_from(dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2), shape, strategy)
    randomise(layer)
    prune_filters(nn.Sequential(layer), 0.25)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.attn, layer.bias)]

    def fn(x, weight, attn, bias):
        return torch.func.functional_call(layer, {"weight": weight, "attn": attn, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_auto_strategy_picks_the_smaller_tensor():
    layer = FilterAttentionConv2d(512, 512, 3, padding=1, bias=False, device="meta")  # layer4 3x3 of ResNet-50
    assert layer.weight[0].numel() == 4608
    assert layer.resolved_strategy((1, 512, 7, 7)) == "output"  # 49 positions < 4608 weights per filter
    assert layer.resolved_strategy((512, 7, 7)) == "output"  # unbatched
    assert layer.resolved_strategy((94, 512, 7, 7)) == "output"  # 94·49 = 4606 < 4608
    assert layer.resolved_strategy((95, 512, 7, 7)) == "weight"  # 95·49 = 4655
    tie = FilterAttentionConv2d(4, 4, 3, padding=1, device="meta")  # 36 weights per filter
    assert tie.resolved_strategy((1, 4, 6, 6)) == "weight"  # 36 positions: a tie scales the weight
    assert tie.resolved_strategy((1, 4, 5, 7)) == "output"  # 35
    layer1 = FilterAttentionConv2d(64, 64, 3, padding=1, bias=False, device="meta")
    assert layer1.weight.numel() == 36_864
    assert layer1.resolved_strategy((256, 64, 56, 56)) == "weight"
    assert layer1.resolved_strategy((1, 64, 56, 56)) == "weight"
    layer.strategy = "weight"
    assert layer.resolved_strategy((1, 512, 7, 7)) == "weight"
    layer.strategy = "output"
    assert layer.resolved_strategy((256, 512, 7, 7)) == "output"
    full = FilterAttentionConv2d(512, 512, 3, padding=1, device="meta", shape="out_in")
    assert full.resolved_strategy((1, 512, 7, 7)) == "weight"


def test_unbatched_input_and_channels_last():
    for strategy in STRATEGIES:
        layer = layer_from(dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), strategy=strategy)
        randomise(layer)
        x = torch.randn(3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(layer(x), layer(x[None])[0], rtol=1e-12, atol=1e-12)
    net = TinyResNet().eval()
    add_filter_attention(net, "out")
    for layer in filter_attention_layers(net).values():
        randomise(layer)
    x = torch.randn(2, 3, 12, 12)
    expected = net(x)
    for strategy in STRATEGIES:
        for layer in filter_attention_layers(net).values():
            layer.strategy = strategy
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
        y = net_cl(x_cl)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        feature = net_cl.conv1(x_cl)
        assert feature.is_contiguous(memory_format=torch.channels_last), strategy
        y.sum().backward()
        assert all(m.attn.grad is not None for m in filter_attention_layers(net_cl).values())


# ----------------------------------------------------------------------------------------------
# Whole-model wrapping, state dicts, counts


def test_layers_subset_and_shared_modules():
    net = TinyResNet()
    attns = add_filter_attention(net, "out_in", layers=["downsample.0", "conv2"])
    assert list(filter_attention_layers(net)) == ["conv2", "downsample.0"]
    assert [tuple(a.shape) for a in attns] == [(8, 4), (12, 8)]  # module order, C_in / groups
    assert type(net.conv1) is nn.Conv2d
    add_filter_attention(net, layers="conv1")  # a single name; the rest may be wrapped later
    assert isinstance(net.conv1, FilterAttentionConv2d)

    shared = nn.Conv2d(3, 3, 1)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    (attn,) = add_filter_attention(seq)
    assert seq[0] is seq[2] and isinstance(seq[0], FilterAttentionConv2d) and seq[0].attn is attn


def test_state_dict_round_trip_and_loading_pretrained_weights():
    pretrained = TinyResNet()
    state = copy.deepcopy(pretrained.state_dict())
    net = TinyResNet()
    add_filter_attention(net)
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == sorted(f"{n}.attn" for n in CONV_NAMES) and not result.unexpected_keys
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(m.attn, torch.ones_like(m.attn)) for m in filter_attention_layers(net).values())

    # A pruned, trained checkpoint loads (strictly) into a fresh, unpruned wrapper, mask included.
    for layer in filter_attention_layers(net).values():
        randomise(layer)
    masks = prune_filters(net, 0.25)
    saved = net.state_dict()
    assert all(f"{n}.filter_mask" in saved for n in CONV_NAMES)
    fresh = TinyResNet()
    add_filter_attention(fresh)
    fresh.load_state_dict(saved)
    for name, layer in filter_attention_layers(fresh).items():
        assert torch.equal(layer.filter_mask, masks[name]) and layer.filter_mask.dtype == torch.bool
        assert torch.equal(layer.attn, net.get_submodule(name).attn)
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(fresh.eval()(x), net.eval()(x))


def test_dtype_and_device_moves_carry_attention_and_mask():
    net = TinyResNet()
    add_filter_attention(net)
    prune_filters(net, 0.5)
    net = net.double()
    for layer in filter_attention_layers(net).values():
        assert layer.attn.dtype == torch.float64 and layer.filter_mask.dtype == torch.bool
    assert net(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_resnet_parameter_counts():
    torchvision = pytest.importorskip("torchvision")
    meta = torch.device("meta")  # shapes only: no initialisation, no memory
    with meta:
        r18 = torchvision.models.resnet18(weights=None)
    expected = sum(m.out_channels for m in r18.modules() if isinstance(m, nn.Conv2d))
    assert sum(a.numel() for a in add_filter_attention(r18, "out")) == expected == 4_800
    assert len(filter_attention_layers(r18)) == 20
    # The authors' logs for ResNet-50: 26,560 ('out') and 13,385,920 ('full' = 'out_in') attention scalars.
    for shape, count in (("out", 26_560), ("out_in", 13_385_920)):
        with meta:
            r50 = torchvision.models.resnet50(weights=None)
        assert sum(a.numel() for a in add_filter_attention(r50, shape)) == count
        assert sum(p.numel() for n, p in r50.named_parameters() if n.endswith(".attn")) == count


# ----------------------------------------------------------------------------------------------
# Penalties, ranking, pruning, folding


def two_layer_model(shape: str = "out") -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1))
    add_filter_attention(net, shape)
    return net


def test_penalties_by_hand():
    net = two_layer_model()
    a0, a1 = net[0].attn, net[2].attn
    with torch.no_grad():
        a0.copy_(torch.tensor([1.0, 3.0, -1.0, 0.5]))
        a1.copy_(torch.tensor([2.0, 0.0, -0.5]))
    lam = 0.1
    l2 = filter_attention_penalty(net, "l2", lam)
    expected_l2 = -lam * ((0 + 4 + 4 + 0.25) / 4 + (1 + 1 + 2.25) / 3)
    assert l2.dim() == 0 and l2.requires_grad
    torch.testing.assert_close(l2, torch.tensor(expected_l2))
    g0, g1 = torch.autograd.grad(l2, [a0, a1])
    torch.testing.assert_close(g0, -2 * lam * (a0.detach() - 1) / 4)
    torch.testing.assert_close(g1, -2 * lam * (a1.detach() - 1) / 3)

    l1 = filter_attention_penalty(net, "l1", lam)
    torch.testing.assert_close(l1, torch.tensor(lam * (1 + 3 + 1 + 0.5 + 2 + 0 + 0.5) / 7))
    g0, g1 = torch.autograd.grad(l1, [a0, a1])
    torch.testing.assert_close(g0, lam * torch.sign(a0.detach()) / 7)
    torch.testing.assert_close(g1, lam * torch.sign(a1.detach()) / 7)

    # Only the attention parameters enter; at A = 1 the spread penalty is 0 and l1 is the mean of ones.
    fresh = two_layer_model("out_in")
    assert filter_attention_penalty(fresh, "l2").item() == 0 and filter_attention_penalty(fresh, "l1").item() == 1
    l2 = filter_attention_penalty(fresh, "l2")
    l2.backward()
    assert all(p.grad is None for n, p in fresh.named_parameters() if not n.endswith("attn"))


def test_rank_filters_with_ties_and_both_shapes():
    net = two_layer_model()
    with torch.no_grad():
        net[0].attn.copy_(torch.tensor([0.5, -2.0, 0.5, 1.0]))
        net[2].attn.copy_(torch.tensor([1.0, 1.0, 1.0]))
    ranks = rank_filters(net)
    assert list(ranks) == ["0", "2"] and isinstance(ranks["0"], FilterRanking)
    assert ranks["0"].order.tolist() == [1, 3, 0, 2] and ranks["0"].order.dtype == torch.long
    assert ranks["0"].scores.tolist() == [0.5, 2.0, 0.5, 1.0]
    assert ranks["2"].order.tolist() == [0, 1, 2]

    full = two_layer_model("out_in")
    with torch.no_grad():
        full[0].attn.copy_(torch.tensor([[1.0, -1.0], [0.0, 4.0], [-3.0, 0.0], [0.5, 0.5]]))
    ranks = rank_filters(full)
    assert ranks["0"].scores.tolist() == [1.0, 2.0, 1.5, 0.5]
    assert ranks["0"].order.tolist() == [1, 2, 0, 3]


def test_prune_filters_masks_exact_indices_and_recomputes():
    net = two_layer_model()
    with torch.no_grad():
        net[0].attn.copy_(torch.tensor([0.5, -2.0, 0.5, 0.25]))
        net[2].attn.copy_(torch.tensor([3.0, 0.1, 2.0]))
    masks = prune_filters(net, 0.5)  # floor(2) of 4, floor(1.5) = 1 of 3
    assert masks["0"].tolist() == [True, True, False, False]  # tie 0.5/0.5 at the cut: the ranking's tail, channel 2
    assert masks["2"].tolist() == [True, False, True]
    assert masks["0"].dtype == torch.bool and torch.equal(net[0].filter_mask, masks["0"])
    assert "filter_mask" in dict(net[0].named_buffers()) and "0.filter_mask" in net.state_dict()
    assert "pruned=2" in repr(net[0])
    assert rank_filters(net)["0"].scores.tolist() == [0.5, 2.0, 0.0, 0.0]  # masked filters score 0
    assert rank_filters(net)["0"].order.tolist() == [1, 0, 2, 3]

    # Recomputed from attn, not cumulative: a different fraction and changed scales give a fresh mask.
    with torch.no_grad():
        net[0].attn.copy_(torch.tensor([0.1, 2.0, 5.0, 1.0]))
    masks = prune_filters(net, 0.25)
    assert masks["0"].tolist() == [False, True, True, True] and masks["2"].tolist() == [True, True, True]
    masks = prune_filters(net, 0.0)
    assert all(m.all() for m in masks.values())
    assert prune_filters(net, np.float32(0.25))["0"].tolist() == [False, True, True, True]  # numpy scalars too


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_filters_output_their_bias_and_get_no_gradient(strategy):
    layer = layer_from(dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), strategy=strategy)
    randomise(layer)
    net = nn.Sequential(layer)
    masks = prune_filters(net, 0.25)
    pruned = (~masks["0"]).nonzero().flatten()
    assert len(pruned) == 2
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y[:, pruned], layer.bias[pruned, None, None].expand(2, -1, 5, 5).detach())
    y.square().sum().backward()
    assert torch.all(layer.attn.grad[pruned] == 0) and torch.all(layer.attn.grad[masks["0"]] != 0)


@pytest.mark.parametrize("shape", ["out", "out_in"])
def test_fold_filter_attention(shape):
    net = TinyResNet()
    add_filter_attention(net, shape)
    for layer in filter_attention_layers(net).values():
        randomise(layer)
        layer.strategy = "auto"
    prune_filters(net, 0.25)
    net.eval()
    x = torch.randn(2, 3, 12, 12)
    expected = net(x)
    bias = net.conv4.bias
    folded = fold_filter_attention(net)
    assert folded is net and not filter_attention_layers(net)
    assert not any(n.endswith("attn") or n.endswith("filter_mask") for n in net.state_dict())
    for name in CONV_NAMES:
        conv = net.get_submodule(name)
        assert type(conv) is nn.Conv2d and not conv.training and conv.weight.requires_grad
    # A frozen weight stays frozen.
    frozen = nn.Sequential(FilterAttentionConv2d(3, 4, 3, shape=shape).requires_grad_(False))
    assert not fold_filter_attention(frozen)[0].weight.requires_grad
    assert net.conv4.bias is bias and net.conv4.padding_mode == "reflect" and net.conv3.padding == "same"
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)

    single = FilterAttentionConv2d(3, 4, 3, shape=shape)
    randomise(single)
    folded = fold_filter_attention(single)
    assert type(folded) is nn.Conv2d
    x = torch.randn(1, 3, 5, 5)
    single.strategy = "weight"
    assert torch.equal(folded(x), single(x))  # the same product, then the same convolution


# ----------------------------------------------------------------------------------------------
# Training phases


@pytest.mark.parametrize("phase", ["f", "a", "b", "F", "A", "B"])
def test_apply_phase_selects_exactly_one_group(phase):
    net = TinyResNet()
    add_filter_attention(net)
    groups = {
        "f": {"fc.weight", "fc.bias"},
        "a": {f"{n}.attn" for n in CONV_NAMES},
        "b": {f"{n}.{p}" for n in BN_NAMES for p in ("weight", "bias")},  # downsample.1 included
    }
    params = apply_phase(net, phase)
    expected = groups[phase.lower()]
    names = {n for n, p in net.named_parameters() if any(p is q for q in params)}
    assert names == expected and len(params) == len(expected)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    assert net.training == (phase.lower() == "b")
    assert all(m.training == net.training for m in net.modules())
    running = net.bn1.running_mean.clone()
    F.cross_entropy(net(torch.randn(4, 3, 10, 10)), torch.tensor([0, 1, 2, 3])).backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == expected
    assert torch.equal(net.bn1.running_mean, running) == (phase.lower() != "b")


def test_phase_b_takes_every_batchnorm_kind():
    # Any _BatchNorm subclass, not only BatchNorm2d: e.g. a SyncBatchNorm and a BatchNorm1d after the pooling
    # (nothing runs here: only which parameters the phase trains).
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4)
    )
    add_filter_attention(net)
    params = apply_phase(net, "b")
    assert {n for n, p in net.named_parameters() if any(p is q for q in params)} == {
        "1.weight",
        "1.bias",
        "4.weight",
        "4.bias",
    }


def test_attention_phases_fresh_optimizer_per_phase():
    net = TinyResNet()
    add_filter_attention(net)
    x, target = torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 3])
    seen, optimizers = [], []
    for letter, opt in attention_phases(net, "FfaAb", lr=1e-2):
        assert isinstance(opt, torch.optim.Adam) and not opt.state and opt.defaults["lr"] == 1e-2
        params = opt.param_groups[0]["params"]
        assert all(p.requires_grad for p in params)
        assert sum(p.requires_grad for p in net.parameters()) == len(params)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), target)
        if letter == "a":
            loss = loss + filter_attention_penalty(net, "l2", 1e-2)
        loss.backward()
        opt.step()
        seen.append((letter, net.training))
        optimizers.append(opt)
    assert seen == [("f", False), ("f", False), ("a", False), ("a", False), ("b", True)]
    assert len({id(o) for o in optimizers}) == 5
    assert not all(torch.equal(a, torch.ones_like(a)) for a in (m.attn for m in filter_attention_layers(net).values()))

    opt = next(attention_phases(net, "a", optimizer=torch.optim.SGD, lr=0.1))[1]
    assert isinstance(opt, torch.optim.SGD)


def test_phase_errors():
    net = TinyResNet()
    with pytest.raises(ValueError, match="no filter attention"):
        attention_phases(net, "fa")  # checked when called, before the first phase
    add_filter_attention(net)
    for schedule in ("fax", "", "f a", None):
        with pytest.raises(ValueError, match="schedule"):
            attention_phases(net, schedule)
    with pytest.raises(ValueError, match="unknown classifier"):
        attention_phases(net, "fa", classifier="head")
    with pytest.raises(ValueError, match="unknown classifier"):
        attention_phases(net, "fa", classifier=["fc", "head"])
    with pytest.raises(ValueError, match="classifier"):
        attention_phases(net, "fa", classifier=[])
    with pytest.raises(ValueError, match="phase"):
        apply_phase(net, "c")
    with pytest.raises(ValueError, match="unknown classifier"):
        apply_phase(net, "f", classifier="classifier")
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    add_filter_attention(no_bn)
    with pytest.raises(ValueError, match="BatchNorm"):
        attention_phases(no_bn, "ab", classifier="2")
    assert len(apply_phase(nn.Sequential(TinyResNet()), "f", classifier="0.fc")) == 2


# ----------------------------------------------------------------------------------------------
# Errors


def test_add_filter_attention_errors():
    net = TinyResNet()
    with pytest.raises(ValueError, match=r"unknown layer name.*'conv9'.*'conv1'"):
        add_filter_attention(net, layers=["conv1", "conv9"])
    with pytest.raises(TypeError, match="not an nn.Conv2d"):
        add_filter_attention(net, layers=["bn1"])
    with pytest.raises(ValueError, match="shape"):
        add_filter_attention(net, shape="in")
    with pytest.raises(ValueError, match="strategy"):
        add_filter_attention(net, strategy="fused")
    with pytest.raises(ValueError, match="shape='out'"):
        add_filter_attention(net, shape="out_in", strategy="output")
    with pytest.raises(TypeError, match="bare Conv2d"):
        add_filter_attention(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        add_filter_attention(nn.Sequential(nn.Linear(2, 2)))
    assert all(type(m) is not FilterAttentionConv2d for m in net.modules())  # nothing half-done

    add_filter_attention(net, layers=["conv1"])
    with pytest.raises(ValueError, match="double wrapping"):
        add_filter_attention(net)
    with pytest.raises(ValueError, match="double wrapping"):
        add_filter_attention(net, layers=["conv1"])
    with pytest.raises(ValueError, match="already"):
        FilterAttentionConv2d.from_conv(net.conv1)
    with pytest.raises(ValueError, match="strategy"):
        net.conv1.strategy = "bogus"
    add_filter_attention(net, "out_in", layers=["conv2"])
    with pytest.raises(ValueError, match="shape='out'"):
        net.conv2.strategy = "output"


def test_unsupported_convolution_subclasses():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    class Tagged(nn.Conv2d):  # no behaviour change: wrapped
        pass

    net = nn.Sequential(PaddedConv(3, 3, 3), Tagged(3, 3, 3), nn.LazyConv2d(3, 1))
    with pytest.raises(ValueError, match="not initialised"):
        add_filter_attention(net)
    net(torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="skipped 1 convolution"):
        attns = add_filter_attention(net)
    assert len(attns) == 2 and type(net[0]) is PaddedConv and isinstance(net[1], FilterAttentionConv2d)
    with pytest.raises(TypeError, match="overrides forward"):
        add_filter_attention(nn.Sequential(PaddedConv(3, 3, 3)), layers=["0"])

    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 1)))
    with pytest.raises(TypeError, match="parametrized"):
        add_filter_attention(wn, layers="0")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="no nn.Conv2d"):
        warnings.simplefilter("ignore")
        add_filter_attention(wn)


def test_no_attention_layers_errors():
    net = TinyResNet()
    for fn in (
        lambda: filter_attention_penalty(net),
        lambda: rank_filters(net),
        lambda: prune_filters(net, 0.25),
        lambda: fold_filter_attention(net),
    ):
        with pytest.raises(ValueError, match="no filter attention"):
            fn()
    add_filter_attention(net)
    with pytest.raises(ValueError, match="kind"):
        filter_attention_penalty(net, "l3")
    for fraction in (1.0, -0.1, 1.5, float("nan"), True, "0.25"):
        with pytest.raises(ValueError, match="fraction"):
            prune_filters(net, fraction)


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2, bias=False))
    add_filter_attention(net, layers=["0"])
    add_filter_attention(net, "out_in", layers=["2"])
    for layer in filter_attention_layers(net).values():
        randomise(layer)
    prune_filters(net, 0.25)
    x = torch.randn(2, 3, 6, 6)
    for strategy in ("output", "weight"):
        net[0].strategy = strategy
        eager = net(x)
        e_grads = torch.autograd.grad(eager.square().sum(), [m.attn for m in filter_attention_layers(net).values()])
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        c_grads = torch.autograd.grad(got.square().sum(), [m.attn for m in filter_attention_layers(net).values()])
        torch.testing.assert_close(got, eager)
        for g, e in zip(c_grads, e_grads, strict=True):
            torch.testing.assert_close(g, e)


def test_torch_compile_auto_strategy_follows_the_batch_size():
    """'auto' branches on shapes only: a new batch size that flips the choice recompiles instead of breaking."""
    torch._dynamo.reset()
    layer = FilterAttentionConv2d(8, 4, 3, padding=1, dtype=torch.float64)  # 72 weights per filter
    randomise(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for batch, expected in ((1, "output"), (5, "weight")):  # 1·4·4 = 16 < 72 <= 5·4·4 = 80 output elements
        x = torch.randn(batch, 8, 4, 4, dtype=torch.float64)
        assert layer.resolved_strategy(x.shape) == expected
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-12, atol=1e-12)
