"""Similarity-based initialisation of a new classifier (Pascal, Bost & Huet, CBMI 2019).

A network trained on S source classes gets a head for T new target classes whose weights start as a mix of the
source classes' weights, chosen by how similar each target class is to each source class:

1. a similarity matrix ``sim`` of shape (T, S): semantic (:func:`ktkernels.transfer.semantic_similarity`, Lin or
   Wu-Palmer over a hypernym hierarchy) or visual (:func:`visual_similarity`, the mean source softmax of each target
   class's images);
2. keep the top-k entries of each row, zero the rest, and normalise each row to sum to 1 (:func:`similarity_weights`);
3. ``W_t = sim~ @ W_s`` and ``b_t = sim~ @ b_s`` (:func:`init_classifier_from_similarity`).

The paper's text and code were not available: k, the normalisation and the bias transfer are a labelled reading
(``../shared/reference/methods.md`` §2). This runs once, before training: a (T, S) x (S, D) product and a top-k,
so there is no kernel to fuse.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..checks import is_int

__all__ = ["init_classifier_from_similarity", "similarity_weights", "visual_similarity"]


def similarity_weights(similarity: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest entries of each row of ``similarity``, zero the rest and normalise rows to sum to 1.

    Args:
        similarity: (T, S) non-negative similarities of T target classes to S source classes.
        k: how many source classes each target class draws from, ``1 <= k <= S``. Ties are broken by
            :func:`torch.topk`.

    Returns:
        (T, S) float64 mixing weights on ``similarity``'s device; each row has at most k non-zeros and sums to 1.

    >>> similarity_weights(torch.tensor([[0.1, 0.6, 0.3]]), k=2)
    tensor([[0.0000, 0.6667, 0.3333]], dtype=torch.float64)
    """
    sim = _check_similarity(similarity)
    n_source = sim.shape[1]
    if not is_int(k) or not 1 <= k <= n_source:
        raise ValueError(f"k must be an int in [1, {n_source}] (the number of source classes), got {k!r}")
    values, index = sim.topk(int(k), dim=1)
    values = values / values[:, :1].clamp_min(torch.finfo(values.dtype).tiny)  # row max 1: the sum cannot overflow
    kept = torch.zeros_like(sim).scatter_(1, index, values)
    mass = kept.sum(dim=1, keepdim=True)
    empty = (mass[:, 0] <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"target classes (rows) {_few(empty)} have zero similarity to all of their top-{k} source classes: "
            "their weights would be undefined; use a larger k or another similarity"
        )
    return kept / mass


def init_classifier_from_similarity(
    source_fc: nn.Linear, similarity: Tensor, k: int = 5, bias: bool = True
) -> nn.Linear:
    """A new ``nn.Linear`` for T target classes, initialised as a top-k mix of the source classifier's rows.

    ``W_t = sim~ @ W_s`` and ``b_t = sim~ @ b_s``, with ``sim~ = similarity_weights(similarity, k)``: each target
    class starts as a convex combination of its k most similar source classes, so the new head already "votes" for
    the target class wherever the source network sees its look-alikes.

    Args:
        source_fc: the source classifier, weight (S, D) and optional bias (S,). It is not modified.
        similarity: (T, S) non-negative target-to-source similarities (semantic or visual).
        k: source classes kept per target class, ``1 <= k <= S``. k = 5 is a reading; the paper's k is unknown.
        bias: give the new head a bias: ``sim~ @ b_s`` when the source has one, zeros otherwise.

    Returns:
        ``nn.Linear(D, T)`` on the source's device and dtype, with fresh parameters (requires_grad=True).

    >>> fc = nn.Linear(4, 3)
    >>> head = init_classifier_from_similarity(fc, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]), k=2)
    >>> torch.allclose(head.weight[1], (fc.weight[0] + fc.weight[2]) / 2)
    True
    """
    if not isinstance(source_fc, nn.Linear):
        raise TypeError(f"source_fc must be an nn.Linear (the source classifier), got {type(source_fc).__name__}")
    sim = _check_similarity(similarity)
    n_source = source_fc.out_features
    if sim.shape[1] != n_source:
        raise ValueError(
            f"similarity has {sim.shape[1]} source columns but source_fc has {n_source} classes (out_features): "
            "similarity must be (target classes, source classes)"
        )
    weight = source_fc.weight
    mix = similarity_weights(sim, k).to(weight.device)
    head = nn.Linear(source_fc.in_features, sim.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(mix @ weight.detach().double())
        if bias:
            source_bias = source_fc.bias
            head.bias.copy_(mix @ source_bias.detach().double() if source_bias is not None else 0.0)
    return head


@torch.no_grad()
def visual_similarity(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor],
    target_labels: int | Sequence[int] | Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """The mean source softmax of each target class: ``sim[t, s] = mean over images x of class t of p_s(x)``.

    One pass over ``data`` in eval mode and inference mode: each batch's softmax (fp32) is added into a (T, S)
    buffer by label (``index_add_``), then divided by the class counts. The model's training flag is restored.

    Args:
        model: the frozen source network; ``model(x)`` must return (N, S) logits over the S source classes.
        data: an iterable of ``(inputs, labels)`` batches (e.g. a DataLoader), or one ``(inputs, labels)`` pair of
            tensors, which is split into batches of ``batch_size``. Labels are integer target labels, shape (N,).
        target_labels: T, when the labels are ``0..T-1``; or the T label values in row order (row r is the class
            whose label is ``target_labels[r]``).
        batch_size: batch size when ``data`` is a pair of tensors.
        device: where to run ``model``; default the device of its first parameter (CPU if it has none).

    Returns:
        (T, S) float32 on ``device``; each row sums to 1. Feed it to :func:`init_classifier_from_similarity`.

    >>> model = nn.Linear(2, 3)
    >>> sim = visual_similarity(model, (torch.randn(10, 2), torch.arange(10) % 2), target_labels=2)
    >>> sim.shape, bool(torch.allclose(sim.sum(1), torch.ones(2)))
    (torch.Size([2, 3]), True)
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    labels_in_order = _target_label_values(target_labels)
    n_target = len(labels_in_order)
    # label -> row through a sorted copy of the target labels (searchsorted), so any label values work
    sorted_labels, row_of_sorted = torch.tensor(labels_in_order, device=device).sort()

    sums: Tensor | None = None
    counts = torch.zeros(n_target, dtype=torch.float64, device=device)
    modes = [(module, module.training) for module in model.modules()]  # each one: frozen BatchNorms stay frozen
    model.eval()
    try:
        for inputs, labels in _batches(data, batch_size):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integers, got {labels.dtype}")
            labels = labels.to(device, non_blocking=True).long().flatten()
            position = torch.searchsorted(sorted_labels, labels).clamp_(max=n_target - 1)
            known = sorted_labels[position] == labels
            if not bool(known.all()):
                unknown = sorted(set(labels[~known].tolist()))
                raise ValueError(f"labels {_few(unknown)} are not among the target labels {_few(labels_in_order)}")
            rows = row_of_sorted[position]
            logits = model(inputs.to(device, non_blocking=True))
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"model must return (N, S) logits for {labels.shape[0]} inputs, got {got}")
            if sums is None:
                sums = torch.zeros(n_target, logits.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, rows, logits.float().softmax(dim=1).double())
            counts += torch.bincount(rows, minlength=n_target).double()
    finally:
        for module, training in modes:
            module.training = training
    missing = (counts == 0).nonzero().flatten().tolist()
    if sums is None or missing:
        absent = [labels_in_order[r] for r in missing] if sums is not None else labels_in_order
        raise ValueError(f"no images for target labels {_few(absent)}: their visual similarity is undefined")
    return (sums / counts[:, None]).float()


def _check_similarity(similarity: Tensor) -> Tensor:
    if not isinstance(similarity, Tensor):
        try:
            similarity = torch.as_tensor(similarity)
        except (TypeError, RuntimeError, ValueError) as error:
            raise TypeError(f"similarity must be a (T, S) tensor or array, got {type(similarity).__name__}") from error
    if similarity.dim() != 2 or similarity.shape[0] == 0 or similarity.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty (T, S) matrix, got shape {tuple(similarity.shape)}")
    if similarity.is_complex() or similarity.dtype == torch.bool:
        raise TypeError(f"similarity must be real, got {similarity.dtype}")
    sim = similarity.detach().double()
    if not bool(torch.isfinite(sim).all()) or bool((sim < 0).any()):
        raise ValueError("similarity must be finite and non-negative (clamp cosine similarities with clamp(min=0))")
    return sim


def _target_label_values(target_labels: int | Sequence[int] | Tensor) -> list[int]:
    # A 0-dim integer tensor or a numpy integer is a count, as an int is (a sequence or 1-D tensor lists labels).
    if isinstance(target_labels, Tensor) and target_labels.dim() == 0 and not target_labels.is_floating_point():
        target_labels = int(target_labels)
    elif not isinstance(target_labels, (Tensor, bool, int)) and hasattr(type(target_labels), "__index__"):
        target_labels = operator.index(target_labels)
    if isinstance(target_labels, int) and not isinstance(target_labels, bool):
        if target_labels < 1:
            raise ValueError(f"target_labels must be >= 1 classes, got {target_labels}")
        return list(range(target_labels))
    values = torch.as_tensor(target_labels).flatten().tolist()
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ValueError(f"target_labels must be a count or non-empty non-negative integer labels, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"target_labels has repeated labels: {values!r}")
    return values


def _batches(data, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        inputs, labels = data
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"inputs ({inputs.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return zip(inputs.split(batch_size), labels.split(batch_size), strict=True)
    return data


def _few(values: Sequence, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
