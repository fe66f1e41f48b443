"""Mentor -> mentee probes by module name (Venkatesan & Li 2016): errors by hand, gradient routing, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ktkernels import AnnealedWeight
from ktkernels.transfer import ProbePairs


def _mentor():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def _mentee():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _run(mentor, mentee, x):
    with torch.no_grad():
        mentor(x)
    mentee(x)


@pytest.mark.parametrize("error", ["rmse", "l2", "l1"])
def test_errors_by_hand(error):
    mentor, mentee = _mentor(), _mentee()
    x = torch.randn(3, 1, 8, 8)
    with ProbePairs(mentor, mentee, [("1", "0"), ("", "")], error=error) as probes:
        _run(mentor, mentee, x)
        terms = probes.terms()
        loss = probes.loss()
    with torch.no_grad():
        pairs = [(mentor[1](mentor[0](x)), mentee[0](x)), (mentor(x), mentee(x))]
    expected = []
    for m, s in pairs:
        d = (s - m).double().flatten().tolist()
        if error == "rmse":
            expected.append(math.sqrt(sum(v * v for v in d) / len(d)))
        elif error == "l2":
            expected.append(math.sqrt(sum(v * v for v in d)))
        else:
            expected.append(sum(abs(v) for v in d))
    assert list(terms) == ["1 -> 0", "<output> -> <output>"]
    for got, want in zip(terms.values(), expected, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected), rel=1e-5)


def test_gradient_reaches_only_the_mentee():
    mentor, mentee = _mentor(), _mentee()
    probes = ProbePairs(mentor, mentee, {"1": "0"})
    x = torch.randn(2, 1, 8, 8)
    mentor(x)  # even without no_grad, the mentor's captured output is detached
    mentee(x)
    (AnnealedWeight(2.0, 0.1, 135)(1) * probes.loss()).backward()
    assert all(p.grad is None for p in mentor.parameters())
    assert mentee[0].weight.grad is not None and mentee[0].weight.grad.abs().sum() > 0
    assert mentee[2].weight.grad is None  # the probe sits before the classifier
    probes.remove()


def test_equal_outputs_give_zero_loss_and_zero_grad():
    mentor = nn.Sequential(nn.Linear(5, 5))
    mentee = nn.Sequential(nn.Linear(5, 5))
    mentee.load_state_dict(mentor.state_dict())
    probes = ProbePairs(mentor, mentee, [("0", "0")])
    x = torch.randn(4, 5)
    _run(mentor, mentee, x)
    loss = probes.loss()
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(mentee[0].weight.grad).all() and mentee[0].weight.grad.abs().sum() == 0


def test_loss_forgets_the_captured_outputs():
    mentor, mentee = _mentor(), _mentee()
    probes = ProbePairs(mentor, mentee, [("1", "0")])
    x = torch.randn(2, 1, 8, 8)
    _run(mentor, mentee, x)
    probes.loss()
    with pytest.raises(RuntimeError, match="no output captured from mentor module '1'"):
        probes.loss()
    mentee(x)  # a mentee forward alone is not enough: the mentor's features would be stale
    with pytest.raises(RuntimeError, match="run the mentor forward"):
        probes.loss()
    mentor(x)  # nor a mentor forward alone: the failed loss() forgot the mentee's features too
    with pytest.raises(RuntimeError, match="run the mentee forward"):
        probes.loss()


def test_shape_mismatch_is_a_clear_error():
    mentor, mentee = _mentor(), _mentee()
    probes = ProbePairs(mentor, mentee, [("2", "0")])  # (N, 6, 4, 4) vs (N, 4, 6, 6)
    _run(mentor, mentee, torch.randn(2, 1, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"probe pair 2 -> 0: mentor output \(2, 6, 4, 4\) and mentee output "
        r"\(2, 4, 6, 6\) differ; mentee supervision has no adapter layers",
    ):
        probes.loss()


def test_unknown_names_and_bad_arguments():
    mentor, mentee = _mentor(), _mentee()
    with pytest.raises(ValueError, match=r"unknown mentee module names: '00' \(close: 0\)"):
        ProbePairs(mentor, mentee, [("1", "00")])
    with pytest.raises(ValueError, match="unknown mentor module names: 'layer9'"):
        ProbePairs(mentor, mentee, [("layer9", "0")])
    with pytest.raises(ValueError, match="error must be one of"):
        ProbePairs(mentor, mentee, [("1", "0")], error="kl")
    with pytest.raises(ValueError, match="pairs is empty"):
        ProbePairs(mentor, mentee, [])
    with pytest.raises(ValueError, match="strings"):
        ProbePairs(mentor, mentee, [("1", "0", "2")])
    # no hooks are left behind by a failed construction
    assert not any(m._forward_hooks for m in [*mentor.modules(), *mentee.modules()])


def test_non_tensor_output_is_rejected():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    mentor, mentee = nn.Sequential(Pair()), nn.Sequential(Pair())
    ProbePairs(mentor, mentee, [("0", "0")])
    with pytest.raises(TypeError, match="mentor module '0' returned tuple"):
        mentor(torch.randn(2, 3))


def test_remove_detaches_every_hook():
    mentor, mentee = _mentor(), _mentee()
    probes = ProbePairs(mentor, mentee, [("1", "0"), ("", "")])
    assert sum(len(m._forward_hooks) for m in [*mentor.modules(), *mentee.modules()]) == 4
    probes.remove()
    assert not any(m._forward_hooks for m in [*mentor.modules(), *mentee.modules()])
    with pytest.raises(RuntimeError, match="removed"):
        probes.loss()


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_a_probed_network_is_not_probed(how):
    """A frozen teacher is often a copy of the student: its forward must not overwrite the student's captured
    features (the hooks travel with the modules). The copy runs with hooks that do nothing, and a whole probed
    module can be saved and loaded."""
    import copy
    import io

    mentor, mentee = _mentor(), _mentee()
    probes = ProbePairs(mentor, mentee, [("1", "0"), ("", "")])
    x = torch.randn(3, 1, 8, 8)
    _run(mentor, mentee, x)
    expected = probes.terms()
    if how == "deepcopy":
        copies = copy.deepcopy(mentor), copy.deepcopy(mentee)
    else:
        copies = []
        for net in (mentor, mentee):
            buffer = io.BytesIO()
            torch.save(net, buffer)
            buffer.seek(0)
            copies.append(torch.load(buffer, weights_only=False))
    for copied in copies:
        with torch.no_grad():
            for p in copied.parameters():
                p.mul_(-3.0)
            copied(torch.randn(3, 1, 8, 8))
    got = probes.terms()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    probes.remove()
    assert not any(m._forward_hooks for m in [*mentor.modules(), *mentee.modules()])


def test_a_tap_refuses_an_output_changed_in_place_later_in_the_forward():
    """A tap keeps a reference: an in-place op after the tapped module (ReLU(inplace=True), ``out += identity``)
    would change what it returns, so reading it raises; an output nothing changes reads normally, also under
    ``torch.inference_mode`` (whose tensors keep no version counter)."""
    from ktkernels.transfer import FeatureTap

    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1))
    with FeatureTap(net, ["0", "1"]) as tap:
        net(torch.randn(2, 1, 3, 3))
        with pytest.raises(RuntimeError, match="modified in place"):
            tap["0"]
        assert tap["1"].min() >= 0
    with FeatureTap(net, ["2"], detach=True) as tap, torch.inference_mode():
        assert net(torch.randn(2, 1, 3, 3)).shape == tap["2"].shape


def test_fp64_features_give_an_fp64_loss_for_every_error():
    mentor, mentee = _mentor().double(), _mentee().double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for error in ("rmse", "l2", "l1"):
        with ProbePairs(mentor, mentee, [("1", "0"), ("", "")], error=error) as probes:
            _run(mentor, mentee, x)
            assert probes.loss().dtype == torch.float64, error


def test_repeated_pairs_are_refused():
    with pytest.raises(ValueError, match="repeated"):
        ProbePairs(_mentor(), _mentee(), [("1", "0"), ("1", "0")])


def test_annealed_weight_refuses_a_nan_epoch():
    with pytest.raises(ValueError, match="epoch"):
        AnnealedWeight(2.0, 0.1, 10)(float("nan"))
    assert AnnealedWeight(2.0, 0.0, np.int64(10))(5) == 1.0  # a numpy epoch count is taken


@pytest.mark.parametrize("whole_step", [False, True])
def test_loss_under_torch_compile_fullgraph(whole_step):
    """The probe loss compiles with fullgraph=True, alone (features captured by eager forwards, as when only the loss
    function is compiled) or with both forwards in the graph, and gives eager's value and mentee gradient."""
    torch._dynamo.reset()
    mentor, mentee = _mentor(), _mentee()
    x = torch.randn(3, 1, 8, 8)
    with ProbePairs(mentor, mentee, [("1", "0"), ("", "")]) as probes:
        _run(mentor, mentee, x)
        expected = probes.loss()
        (expected_grad,) = torch.autograd.grad(expected, mentee[0].weight)

        def step():
            if whole_step:
                _run(mentor, mentee, x)
            return probes.loss()

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for _ in range(2):  # the second call reuses the graph
            if not whole_step:
                _run(mentor, mentee, x)
            loss = compiled()
            torch.testing.assert_close(loss, expected)
            torch.testing.assert_close(torch.autograd.grad(loss, mentee[0].weight)[0], expected_grad)
