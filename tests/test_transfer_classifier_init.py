"""Similarity-based classifier initialisation (Pascal et al. 2019): top-k mixing, the new head, visual similarity,
and a real source model trained here on scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ktkernels.transfer import init_classifier_from_similarity, similarity_weights, visual_similarity


def test_similarity_weights_by_hand():
    sim = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.0, 0.0, 3.0, 1.0]])
    expected = torch.tensor([[2 / 3, 1 / 3, 0, 0], [0, 0, 3 / 4, 1 / 4]], dtype=torch.float64)
    torch.testing.assert_close(similarity_weights(sim, k=2), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(similarity_weights(sim, k=1), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]).double())
    torch.testing.assert_close(similarity_weights(sim, k=np.int64(2)), expected, rtol=0, atol=1e-15)  # numpy too
    full = similarity_weights(sim, k=4)  # k = S keeps every entry: plain row normalisation
    torch.testing.assert_close(full, sim.double() / sim.double().sum(1, keepdim=True))


@pytest.mark.parametrize("source_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_head_is_the_top_k_mix(source_bias, dtype):
    torch.manual_seed(0)
    source = nn.Linear(7, 5, bias=source_bias, dtype=dtype)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    sim = torch.rand(3, 5)
    head = init_classifier_from_similarity(source, sim, k=2)

    mix = torch.zeros(3, 5, dtype=torch.float64)
    for t in range(3):  # explicit loop: the two largest entries of each row, divided by their sum
        top = sorted(range(5), key=lambda s: -float(sim[t, s]))[:2]
        for s in top:
            mix[t, s] = float(sim[t, s]) / float(sim[t, top].sum())
    w_s = source.weight.detach().double()
    expected_bias = mix @ source.bias.detach().double() if source_bias else torch.zeros(3, dtype=torch.float64)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (7, 3)
    assert head.weight.dtype == dtype and head.weight.requires_grad and head.bias.requires_grad
    torch.testing.assert_close(head.weight.detach().double(), mix @ w_s, **tol)
    torch.testing.assert_close(head.bias.detach().double(), expected_bias, **tol)
    for key, value in source.state_dict().items():  # the source is left alone
        assert torch.equal(value, before[key])
    assert head.weight.data_ptr() != source.weight.data_ptr()


def test_head_without_bias():
    head = init_classifier_from_similarity(nn.Linear(4, 3), torch.rand(2, 3), k=3, bias=False)
    assert head.bias is None and head.weight.shape == (2, 4)


@pytest.mark.parametrize(
    ("similarity", "k", "match"),
    [
        (torch.rand(2, 3), 0, "k must be"),
        (torch.rand(2, 3), 4, r"k must be an int in \[1, 3\]"),
        (torch.rand(2, 3), 1.5, "k must be"),
        (torch.rand(2, 3), True, "k must be"),
        (torch.rand(2, 4), 2, "4 source columns but source_fc has 3 classes"),
        (torch.rand(3), 2, r"\(T, S\)"),
        (torch.rand(0, 3), 2, r"\(T, S\)"),
        (torch.tensor([[0.5, -0.1, 0.2]]), 2, "non-negative"),
        (torch.tensor([[0.5, float("nan"), 0.2]]), 2, "finite"),
        (torch.tensor([[0.5, 0.1, 0.2], [0.0, 0.0, 0.0]]), 2, r"rows\) \[1\] have zero similarity"),
    ],
)
def test_bad_similarity_or_k(similarity, k, match):
    with pytest.raises(ValueError, match=match):
        init_classifier_from_similarity(nn.Linear(4, 3), similarity, k=k)


def test_source_must_be_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        init_classifier_from_similarity(nn.Conv2d(3, 3, 1), torch.rand(2, 3), k=1)


class _Recorder(nn.Module):
    """A linear classifier that records the training flag it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.fc(x)


def _mean_softmax_by_class(model, x, y, labels):
    """float64 reference: a Python loop over classes."""
    fc = model.fc
    with torch.no_grad():
        p = nn.functional.linear(x.double(), fc.weight.double(), fc.bias.double()).softmax(1)
    return torch.stack([p[y == label].mean(0) for label in labels])


def test_visual_similarity_is_the_mean_softmax_per_class():
    torch.manual_seed(1)
    model = _Recorder()
    x, y = torch.randn(23, 6), torch.arange(23) % 3
    model.train()
    sim = visual_similarity(model, (x, y), target_labels=3, batch_size=5)
    assert model.training and model.modes and not any(model.modes)  # eval inside, training flag restored
    assert len(model.modes) == 5  # the pair of tensors split into ceil(23 / 5) batches
    assert sim.shape == (3, 4) and sim.dtype == torch.float32 and not sim.requires_grad
    expected = _mean_softmax_by_class(model, x, y, range(3))
    torch.testing.assert_close(sim.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sim.sum(1), torch.ones(3))
    # a DataLoader and a different batching give the same result
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    torch.testing.assert_close(visual_similarity(model, loader, 3), sim, rtol=1e-6, atol=1e-7)


def test_visual_similarity_with_label_values_in_row_order():
    torch.manual_seed(2)
    model = _Recorder()
    x = torch.randn(12, 6)
    y = torch.tensor([7, 3, 3, 7, 9, 3, 7, 9, 9, 3, 7, 9])
    sim = visual_similarity(model, (x, y), target_labels=[9, 3, 7])
    torch.testing.assert_close(sim.double(), _mean_softmax_by_class(model, x, y, [9, 3, 7]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("labels", "target_labels", "match"),
    [
        (torch.tensor([0, 1, 5, 1]), 3, r"labels \[5\] are not among"),
        (torch.tensor([0, 1, -1, 1]), 3, r"labels \[-1\] are not among"),
        (torch.tensor([7, 3, 4, 3]), [3, 7], r"labels \[4\] are not among"),
        (torch.tensor([0, 1, 0, 1]), 3, r"no images for target labels \[2\]"),
        (torch.tensor([0, 1, 0, 1]), [0, 1, 1], "repeated"),
        (torch.tensor([0, 1, 0, 1]), 0, ">= 1"),
    ],
)
def test_visual_similarity_bad_labels(labels, target_labels, match):
    with pytest.raises(ValueError, match=match):
        visual_similarity(nn.Linear(6, 4), (torch.randn(4, 6), labels), target_labels)


def test_visual_similarity_bad_model_output():
    with pytest.raises(ValueError, match=r"\(N, S\) logits"):
        visual_similarity(nn.Flatten(0), (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)), 1)


# ---- a real source model: digits 0-5 are the source classes, 6-9 the target classes -------------------------------


@pytest.fixture(scope="module")
def digits_transfer():
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data set")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    source = y < 6
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    fc = nn.Linear(32, 6)
    model = nn.Sequential(features, fc)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # full-batch training on the ~1080 source images: < 1 s
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[source]), y[source]).backward()
        optimizer.step()
    x_target, y_target = x[~source], y[~source] - 6
    half = len(y_target) // 2
    return model, features, fc, (x_target[:half], y_target[:half]), (x_target[half:], y_target[half:])


def test_digits_similarity_head_beats_chance_and_random_heads(digits_transfer):
    model, features, fc, train, test = digits_transfer
    with torch.no_grad():
        assert (model(train[0]).argmax(1) < 6).all()  # sanity: the source model only knows the source classes
    sim = visual_similarity(model, train, target_labels=4)
    head = init_classifier_from_similarity(fc, sim, k=3)
    with torch.no_grad():
        test_features = features(test[0])
        accuracy = (head(test_features).argmax(1) == test[1]).float().mean().item()
        random_accuracies = []
        for seed in range(20):
            torch.manual_seed(seed)
            random_head = nn.Linear(32, 4)
            random_accuracies.append((random_head(test_features).argmax(1) == test[1]).float().mean().item())
    chance = 1 / 4
    mean_random = sum(random_accuracies) / len(random_accuracies)
    # measured: 0.57 for the similarity head; random heads 0.25 on average, 0.49 at best
    assert accuracy > chance + 0.15, accuracy
    assert accuracy > mean_random + 0.15, (accuracy, mean_random)
    assert accuracy > max(random_accuracies), (accuracy, max(random_accuracies))


def test_similarity_weights_edge_values():
    weights = similarity_weights(torch.tensor([[1e308, 1e308, 0.0]], dtype=torch.float64), 2)  # sum overflows
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    with pytest.raises(TypeError, match="similarity must be"):
        similarity_weights(None, 1)


def test_visual_similarity_keeps_every_module_mode_and_reads_counts():
    """Each submodule's flag is restored (a frozen BatchNorm stays in eval); a 0-dim tensor or numpy integer is a
    class count like an int; float labels are refused rather than truncated."""
    np = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).train()
    model[1].eval()
    data = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    expected = visual_similarity(model, data, 2)
    assert model.training and not model[1].training
    for count in (torch.tensor(2), np.int64(2)):
        torch.testing.assert_close(visual_similarity(model, data, count), expected)
    with pytest.raises(TypeError, match="integers"):
        visual_similarity(model, (torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.5, 1.0])), 2)
